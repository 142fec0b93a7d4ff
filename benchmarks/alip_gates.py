r"""ALIP gates on a trained run: does the Language Consistency Gate down-weight the mismatched
pairs of the built-in data?

    python benchmarks/alip_gates.py /tmp/zoo4/runs/alip_tiny [--data DIR] [--rows 2000]

Loads the run's latest checkpoint (model and the ``alip`` objective's saved similarity EMAs
``ema_tc/ema_xt/ema_xc``; ``gamma`` from the run's config), reads the first ``--rows`` train
rows (default ``<data.source>/train``) in shard order, drops the rows decoding rejects (corrupt
images, overlong texts), and embeds with the trained model, in eval mode, without moving the
EMAs: x (image), t (raw caption: the ``.txt``, swapped for ``noise == "mismatch"`` rows) and
c (the oracle caption ALIP trained on, ``oracle_caption(meta, key, rewrite.sampling.seed)``,
which describes the image's true scene). Then, exactly as in training (``alip.gate_weights``):

    S^tc = <t, c>,  S^xt = <x, t>,  S^xc = <x, c>
    W^s = min(exp(gamma (S^tc - E^tc)), 1)                 (LCG)
    W^t, W^c = exp(gamma (S^xt - E^xt)), exp(gamma (S^xc - E^xc)) where W^s < 1, else 1  (DCG)

Prints ONE JSON line: ``groups`` per sidecar noise kind ("clean" = no noise, "mismatch",
"junk", "near_dup", ...): ``n`` rows kept, mean ``s_tc``/``s_xt``/``s_xc``, mean ``w_s``,
``gated_frac`` (fraction with W^s < 1), ``w_text`` = mean W^s W^t (the weight of the
image-raw text term) and ``w_caption`` = mean W^s W^c; plus ``emas`` (saved), ``batch_means``
(these rows' mean similarities, to compare with the EMAs), ``rejected`` per kind, and
``ws_ratio_mismatch_clean`` = mean W^s(mismatch) / mean W^s(clean).

How to read it: the LCG works when mismatch rows have a clearly lower ``s_tc`` than clean ones,
``gated_frac`` near 1 and ``w_s`` well below clean's, i.e. a ratio well below 1. A ratio near 1
means the gate barely separates them. Note W^s <= 1 always, and with gamma = 2 and cosines in
[-1, 1] it is bounded below by exp(-4) ~ 0.018, so the gate can only down-weight by a bounded
factor. The EMAs follow the training batches' means (with the text views' augmentation), so
about half of even the clean rows can sit below E^tc and be gated a little.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vlmray.config import Config
from vlmray.data import schema
from vlmray.data.decode import prepare_rows
from vlmray.data.ingest import decode_spec, tokenizer_for
from vlmray.data.shards import iter_shards
from vlmray.models import DualEncoder
from vlmray.objectives import ObjectiveMix
from vlmray.objectives.contrastive.alip import AlipLoss, gate_weights
from vlmray.rewrite.captioners import oracle_caption
from vlmray.train.checkpoint import find_latest, load_checkpoint, read_config
from vlmray.train.state import build_core_model, setup_context

_PAIRS = ("tc", "xt", "xc")


@dataclass
class Run:
    """A trained run: its config, model (eval mode) and alip objective with the saved EMAs."""

    cfg: Config
    model: DualEncoder
    alip: AlipLoss
    checkpoint: Path
    step: int


def load_run(run_dir: str) -> Run:
    """The latest checkpoint under ``run_dir``, its model and objectives restored."""
    ckpt = find_latest(run_dir)
    if ckpt is None:
        raise SystemExit(f"no checkpoint (state.pt + progress.json) under {run_dir}")
    cfg = Config.from_dict(read_config(ckpt))
    model = build_core_model(cfg)
    mix = ObjectiveMix.from_specs(cfg.objectives).setup(setup_context(cfg, model))
    if "alip" not in mix.objectives:
        raise SystemExit(f"{ckpt}: the run has no 'alip' objective ({list(mix.objectives)})")
    progress = load_checkpoint(ckpt, model=model, objectives=mix)
    alip = mix.objectives["alip"]
    if int(alip.ema_updates) == 0:
        raise SystemExit(f"{ckpt}/state.pt holds no trained alip EMAs (no 'objectives' "
                         "state, or ema_updates == 0)")
    return Run(cfg, model.eval(), alip.eval(), Path(ckpt), progress.step)


def read_rows(data: str, n: int) -> list[dict[str, Any]]:
    """The first ``n`` samples ({KEY, IMAGE, TEXT, META}) of the shards under ``data``."""
    return list(itertools.islice(iter_shards(data), n))


def noise_kind(meta: object) -> str:
    """The sidecar's ``noise`` ("clean" when empty or absent)."""
    try:
        doc = json.loads(meta) if isinstance(meta, (str, bytes)) else (meta or {})
    except ValueError:
        return "unparsed"
    return str(doc.get("noise") or "clean")


def prepare(run: Run, rows: list[dict[str, Any]]) -> dict[str, np.ndarray]:
    """Rows -> the training batch columns (decode + tokenise), with the oracle captions as
    ``synthetic`` exactly as the ingest prefix hands them to ``prepare_rows``."""
    seed = run.cfg.data.rewrite.sampling.seed
    keys = [r[schema.KEY] for r in rows]
    metas = [r[schema.META] for r in rows]
    oracle = [oracle_caption(m, str(k), seed) if m else "" for k, m in zip(keys, metas)]
    spec = decode_spec(run.cfg.data)
    if not spec.synthetic_caption:
        raise SystemExit("the run's data.extra_texts lacks 'synthetic_caption': not an ALIP run")
    return prepare_rows(keys, [r[schema.IMAGE] for r in rows], [r[schema.TEXT] for r in rows],
                        metas, spec, tokenizer_for(run.cfg.data), synthetic=oracle)


@torch.no_grad()
def embed(model: DualEncoder, cols: dict[str, np.ndarray], batch: int = 256,
          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Normalised float32 (x, t, c), each (N, D), of the given (kept) rows."""
    xs, ts, cs = [], [], []
    for i in range(0, len(cols[schema.PIXELS]), batch):
        sl = slice(i, i + batch)
        xs.append(model.encode_image(torch.from_numpy(cols[schema.PIXELS][sl]))[0])
        ts.append(model.encode_text(torch.from_numpy(cols[schema.TOKENS][sl]),
                                    torch.from_numpy(cols[schema.TOKEN_MASK][sl]))[0])
        cs.append(model.encode_text(torch.from_numpy(cols[schema.SYNTHETIC_TOKENS][sl]),
                                    torch.from_numpy(cols[schema.SYNTHETIC_TOKEN_MASK][sl]))[0])
    return tuple(torch.cat(v).float() for v in (xs, ts, cs))  # type: ignore[return-value]


def gates(run: Run, x: torch.Tensor, t: torch.Tensor, c: torch.Tensor) -> dict[str, torch.Tensor]:
    """Similarities and gate weights (N,) with the run's saved EMAs and gamma."""
    sims = {"tc": (t * c).sum(-1), "xt": (x * t).sum(-1), "xc": (x * c).sum(-1)}
    emas = [getattr(run.alip, f"ema_{p}").float() for p in _PAIRS]
    w_s, w_t, w_c = gate_weights(sims["tc"], sims["xt"], sims["xc"], *emas,
                                 run.alip.cfg.gamma)
    return {**{f"s_{p}": s for p, s in sims.items()}, "w_s": w_s, "w_t": w_t, "w_c": w_c}


def summarise(kinds: list[str], g: dict[str, torch.Tensor]) -> dict[str, dict[str, float]]:
    """Per noise kind: n, mean similarities, mean W^s, gated fraction, mean text/caption weight."""
    out: dict[str, dict[str, float]] = {}
    arr = np.asarray(kinds)
    for kind in sorted(set(kinds)):
        m = torch.from_numpy(arr == kind)
        ws = g["w_s"][m]
        out[kind] = {
            "n": int(m.sum()),
            **{f"s_{p}": round(float(g[f"s_{p}"][m].mean()), 4) for p in _PAIRS},
            "w_s": round(float(ws.mean()), 4),
            "gated_frac": round(float((ws < 1.0).float().mean()), 4),
            "w_text": round(float((ws * g["w_t"][m]).mean()), 4),
            "w_caption": round(float((ws * g["w_c"][m]).mean()), 4),
        }
    return out


def default_data(cfg: Config) -> str:
    """``<data.source>/train`` when it exists, else ``data.source``."""
    train = os.path.join(cfg.data.source, "train")
    return train if os.path.isdir(train) else cfg.data.source


def measure(run_dir: str, data: str | None, n_rows: int) -> dict[str, Any]:
    """The report (see the module docstring)."""
    run = load_run(run_dir)
    rows = read_rows(data or default_data(run.cfg), n_rows)
    cols = prepare(run, rows)
    kinds = [noise_kind(r[schema.META]) for r in rows]
    kept = np.asarray([not r for r in cols[schema.REJECT_REASON]], dtype=bool)
    rejected: dict[str, int] = defaultdict(int)
    for kind, ok in zip(kinds, kept):
        if not ok:
            rejected[kind] += 1
    x, t, c = embed(run.model, {k: cols[k][kept] for k in (
        schema.PIXELS, schema.TOKENS, schema.TOKEN_MASK, schema.SYNTHETIC_TOKENS,
        schema.SYNTHETIC_TOKEN_MASK)})
    g = gates(run, x, t, c)
    groups = summarise([k for k, ok in zip(kinds, kept) if ok], g)
    ratio = (groups["mismatch"]["w_s"] / groups["clean"]["w_s"]
             if "mismatch" in groups and "clean" in groups else None)
    return {
        "run": str(run_dir), "checkpoint": str(run.checkpoint), "step": run.step,
        "rows_read": len(rows), "rows_kept": int(kept.sum()), "rejected": dict(rejected),
        "gamma": run.alip.cfg.gamma,
        "emas": {p: round(float(getattr(run.alip, f"ema_{p}")), 4) for p in _PAIRS},
        "ema_updates": int(run.alip.ema_updates),
        "batch_means": {p: round(float(g[f"s_{p}"].mean()), 4) for p in _PAIRS},
        "groups": groups,
        "ws_ratio_mismatch_clean": None if ratio is None else round(ratio, 4),
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run_dir", help="a trained ALIP run (its checkpoints anywhere under it)")
    p.add_argument("--data", default=None,
                   help="train shards (dir/glob/tar); default <data.source>/train")
    p.add_argument("--rows", type=int, default=2000, help="first N train rows to read")
    args = p.parse_args(argv)
    torch.set_grad_enabled(False)
    print(json.dumps(measure(args.run_dir, args.data, args.rows)))


if __name__ == "__main__":
    main()
