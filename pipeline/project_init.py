"""`trtpipe init`: a project of the user's own (trtpipe installed, their repository) gets a
config skeleton `configs/<name>.yaml`, a `params.yaml` that only names it, and the dvc.yaml
`trtpipe dvc` derives from it. Existing files are never overwritten."""

from __future__ import annotations

import re
from pathlib import Path

from .errors import ConfigError

SKELETON = """\
# trtpipe config for {name}: the truth for every stage (params.yaml only names this file).
# As written it runs the embedded digits model so that `dvc repro` works at once; point model
# and data at your own (model.source: factory, arch: my_module:make, checkpoint: weights.pt;
# data.source: npz | npy | image_folder | factory, path: ...), then run `trtpipe dvc`.
model:
  name: {name}
  source: builtin          # builtin | torchvision | factory
  arch: digits_cnn         # builtin name, torchvision name, or module:function (a module in this project)
  checkpoint: null         # a state_dict file in this project
  num_classes: 10
  inputs:
    - {{name: input, shape: [1, 8, 8], dtype: float32}}
  outputs:
    - {{name: logits}}
  train: {{epochs: 20, batch_size: 64, lr: 0.003, seed: 0}}
data:
  source: digits
  seed: 0
  split: {{train: 0.6, calibration: 0.2, evaluation: 0.2}}
  preprocess: {{scale: 0.0625, mean: [0.5], std: [0.5]}}
export: {{opset: 17, dynamic_batch: true}}
validate: {{num_samples: 256, atol: 1.0e-4, min_cosine: 0.99999}}
calibration: {{method: entropy, num_samples: 320, batch_size: 32}}
build:
  backend: auto            # tensorrt on a GPU with TensorRT, else onnxruntime (a CPU simulation)
  profile: {{min_batch: 1, opt_batch: 32, max_batch: 128}}
evaluate:
  batch_size: 128
  latency: {{warmup: 20, iterations: 200, batch_sizes: [1, 32]}}
publish:
  registry: artifacts/registry
  precisions: [fp32, fp16, int8]
# tune: (optional) the fewest layers kept out of INT8 within an accuracy budget; adds a tune stage
"""

PARAMS = """\
# Names the config. Knobs to sweep with `dvc exp run -S configs/{name}.yaml:calibration.method=minmax`
# (or add a key here that the config does not set). A key set here and in the config to different
# values is an error, unless `override: true` says that the values here win on purpose.
config: configs/{name}.yaml
"""


def project_name(folder: Path) -> str:
    name = re.sub(r"[^A-Za-z0-9_-]+", "-", folder.resolve().name).strip("-")
    return name or "model"


def init(root: Path, name: str | None = None) -> list[Path]:
    """Write the three files into `root`; refuse (before writing anything) if one exists."""
    from . import dvcgen
    from .config import load_config
    from .fileio import write_text

    name = name or project_name(root)
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name):
        raise ConfigError(f"--name '{name}': use letters, digits, '-', '_' or '.' (it names configs/<name>.yaml)")
    config = Path("configs") / f"{name}.yaml"
    files = [root / config, root / "params.yaml", root / "dvc.yaml"]
    existing = [f for f in files if f.exists()]
    if existing:
        raise ConfigError(f"{existing[0]}: already exists; trtpipe init never overwrites a file (move it away, "
                          "or run `trtpipe dvc` to regenerate dvc.yaml alone)")
    write_text(root / config, SKELETON.format(name=name))
    write_text(root / "params.yaml", PARAMS.format(name=name))
    cfg = load_config(root / config, root / "params.yaml", quiet=True)
    doc = dvcgen.generate(cfg, config.as_posix(), root=root)
    if dvcgen.needs_version_file(doc):
        write_text(root / dvcgen.VERSION_FILE, dvcgen.installed_version())
        files.append(root / dvcgen.VERSION_FILE)
    write_text(root / "dvc.yaml", dvcgen.render(doc, config.as_posix()))
    return files
