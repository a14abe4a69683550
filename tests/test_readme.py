"""The README's Python quickstart runs as written on a tiny FLUX pipeline (tests/pipeline_fixtures.py): only the
pipeline path, the image size and the step counts are substituted; its outputs are then checked."""
from __future__ import annotations

import pathlib
import re

import numpy as np
import pytest

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def quickstart() -> str:
    text = README.read_text()
    section = text[text.index("## Python quickstart"):]
    section = section[:section.index("\n## ", 1)]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    assert len(blocks) == 1, "the quickstart section holds one python block"
    return blocks[0]


def test_quickstart_substitutes_only_paths_sizes_and_steps():
    code = quickstart()
    assert code.count('"path/to/FLUX.1-dev"') == 1 and "1024" in code and "num_inference_steps=28" in code
    for needle in ("load_flux_pipeline", "encode_prompts", "pqjax.quantize", "text_to_image", "to_pil", ".save("):
        assert needle in code  # prompt -> embeddings -> quantized transformer -> image -> PNG


def test_readme_python_quickstart_runs(tmp_path, monkeypatch):
    for mod in ("torch", "transformers", "diffusers"):
        pytest.importorskip(mod)
    from pipeline_fixtures import make_pipeline
    _, pipe_path = make_pipeline(tmp_path / "pipe", seed=5)
    code = (quickstart().replace('"path/to/FLUX.1-dev"', repr(pipe_path))
            .replace("1024", "64").replace("num_inference_steps=28", "num_inference_steps=2"))
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(code, str(README), "exec"), scope)

    from PIL import Image

    import pqjax
    image = Image.open(tmp_path / "fox.png")
    assert image.size == (64, 64) and np.asarray(image).std() > 0
    ck = pqjax.load(tmp_path / "flux-dev-nvfp4")
    assert ck.kind == "nvfp4" and ck.quant_config.method == "permuquant" and ck.config == scope["config"]
    report = scope["report"]
    assert report.sites and report.summary().startswith("permuquant nvfp4 (group 16)")
    assert report.config.group_size == 16 and set(report.modes.values()) >= {"w4a4", "w4a16"}
