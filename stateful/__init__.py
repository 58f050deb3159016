"""Keyed state stores, windows and checkpoints, installed as streamfn.stateful."""
