"""Backbones: one DiT class (backbones/dit.py) and its presets; importing this package registers them."""
from backbones import dit
from backbones import lightningdit
