"""Core: registry, config schema, run folder I/O, seeding, EMA and other shared helpers."""
