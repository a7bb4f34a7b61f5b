"""Example semprior-bench plugin: the `displacement` prediction type (docs/adding_a_method.md)."""
