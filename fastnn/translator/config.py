"""Configuration: the annotated default.yaml, merged with a user file and `--set key.path=value` overrides."""
from __future__ import annotations

import copy
import os

import yaml

DEFAULT_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "default.yaml")


def default() -> dict:
    with open(DEFAULT_PATH) as f:
        return yaml.safe_load(f)


def merge(base: dict, over: dict, where: str = "") -> dict:
    """`over` merged into a copy of `base`; a key `base` lacks is an error (catches typos)."""
    out = copy.deepcopy(base)
    for k, v in (over or {}).items():
        if k not in out:
            raise KeyError(f"unknown config key {where + k!r}; known: {', '.join(sorted(out))}")
        out[k] = merge(out[k], v, f"{where}{k}.") if isinstance(out[k], dict) and isinstance(v, dict) else v
    return out


def override(cfg: dict, assignment: str) -> dict:
    """Applies one `a.b.c=value` (the value parsed as YAML: numbers, booleans, lists)."""
    if "=" not in assignment:
        raise ValueError(f"--set expects key=value, got {assignment!r}")
    key, value = assignment.split("=", 1)
    nested: dict = {}
    node = nested
    parts = key.strip().split(".")
    for p in parts[:-1]:
        node = node.setdefault(p, {})
    try:
        parsed = yaml.safe_load(value)
    except yaml.YAMLError:
        # Data specs with slices (tatoeba.tsv[::10]) are not YAML: a bracketed list of them splits on commas,
        # anything else is taken as a string.
        v = value.strip()
        parsed = [x.strip() for x in v[1:-1].split(",") if x.strip()] if v[:1] == "[" and v[-1:] == "]" else v
    if isinstance(parsed, str):
        try:
            parsed = float(parsed)  # YAML 1.1 reads 1e-3 (no dot) as a string
        except ValueError:
            pass
    node[parts[-1]] = parsed
    return merge(cfg, nested)


def load(path: str | None = None, sets=(), base: dict | None = None) -> dict:
    cfg = copy.deepcopy(base) if base is not None else default()
    if path:
        with open(path) as f:
            cfg = merge(cfg, yaml.safe_load(f) or {})
    for s in sets or ():
        cfg = override(cfg, s)
    return cfg
