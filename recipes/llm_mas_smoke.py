"""Tiny LLM MAS end to end, offline, on CPU: build two tiny Qwen2s, record them, run stepwise MAS.

    python -m recipes.llm_mas_smoke                         # inputs in runs/tiny_llms/, the run in runs/llm_tiny/
    python -m recipes.llm_mas_smoke --prepare-only          # only the models and recordings
    python -m recipes.llm_mas_smoke train.max_steps=2       # overrides go to `llm-mas mas`

Steps (each is an ordinary command; run them yourself to change anything):
1. ``build_tiny_qwen2(runs/tiny_llms/models/tiny-a, seed=0)`` and ``tiny-b`` with ``seed=1`` (random weights,
   64-d, 2 layers, a byte-level BPE tokenizer trained on a built-in corpus);
2. ``runs/tiny_llms/texts.txt``: 300 paragraphs of that corpus (prompt texts);
3. ``llm-mas record --model runs/tiny_llms/models/tiny-X --texts runs/tiny_llms/texts.txt
   --out runs/tiny_llms/recordings/tiny-X --n 200 --prompt-len 16 --total-len 40 --device cpu``;
4. ``llm-mas mas llm_tiny [overrides]`` (a shipped preset) → ``runs/llm_tiny/`` (results.json,
   iia_matrix.png, ...).
Models and recordings that already exist are reused (delete ``runs/tiny_llms/`` to rebuild them).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

from llm_mas.llm.tiny import build_tiny_qwen2, tiny_corpus

ROOT = Path(__file__).resolve().parents[1]
WORK = Path("runs/tiny_llms")         # inputs (relative to the repository root, as in the preset)
MODELS = {"tiny-a": 0, "tiny-b": 1}   # name -> weight seed
PRESET = "llm_tiny"                    # the shipped preset llm_mas/presets/llm_tiny.yaml


def _cli(*args: str) -> None:
    """Run ``llm-mas ARGS`` (as ``python -m llm_mas.cli``) and stop on failure."""
    command = [sys.executable, "-m", "llm_mas.cli", *args]
    print("$ llm-mas " + " ".join(args), flush=True)
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env.setdefault("OMP_NUM_THREADS", "1")  # tiny models: more threads only add overhead (15x slower on 2 busy cores)
    if subprocess.run(command, env=env).returncode != 0:
        sys.exit(f"llm-mas {args[0]} failed")


def prepare() -> None:
    """Build the tiny models, the prompt texts and one recording per model (skipping what exists)."""
    texts = WORK / "texts.txt"
    if not texts.exists():
        texts.parent.mkdir(parents=True, exist_ok=True)
        texts.write_text("\n".join(tiny_corpus(300, seed=2024)) + "\n")
    for name, seed in MODELS.items():
        model_dir = WORK / "models" / name
        if not (model_dir / "config.json").exists():
            build_tiny_qwen2(model_dir, seed=seed)
            print(f"built {model_dir} (seed {seed})")
        recording = WORK / "recordings" / name
        if not (recording / "recording.safetensors").exists():
            _cli("record", "--model", str(model_dir), "--texts", str(texts), "--out", str(recording), "--n", "200",
                 "--prompt-len", "16", "--total-len", "40", "--device", "cpu", "--no-progress")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m recipes.llm_mas_smoke", description=__doc__.splitlines()[0])
    parser.add_argument("--prepare-only", action="store_true", help="build models and recordings, skip MAS")
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides for `llm-mas mas`")
    args = parser.parse_args(argv)
    os.chdir(ROOT)  # the preset's paths are relative to the repository root
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    prepare()
    if not args.prepare_only:
        _cli("mas", PRESET, *args.overrides)


if __name__ == "__main__":
    main()
