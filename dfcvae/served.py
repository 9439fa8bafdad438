"""The served model: DFC-VAE behind MLflow's pyfunc interface, its signature, and how it is logged.

`VAEModel` is an `mlflow.pyfunc.PythonModel`; the logged model ships
the `dfcvae` package as code and the train stage's plain-data checkpoint as an artifact,
so `mlflow.pyfunc.load_model("models:/<name>@champion")` works wherever torch and mlflow
are installed. Loading builds only `DFCVAE`, from the `model.py` bundled with that version
(`bundled_model_class`: two versions loaded in one process each run their own network code):
no perceptual network, no VGG or ImageNet weights. A PythonModel, not MLflow 3's torch.export flavour, whose
exported graph would fix the batch size to the input example's.

`predict(model_input, params)`:
  - `model_input`: images (B, 3, H, W) in [-1, 1], 1 <= B <= serve.max_batch: a float array
    (float64 is cast to float32), a nested list, or a torch tensor. Over REST:
    `{"inputs": <nested list>, "params": {...}}`. The signature declares no input schema, so
    that MLflow passes every input here, where a wrong one (8-bit pixels, a wrong shape, NaN)
    gets one sentence on both paths instead of MLflow's schema error with the array dumped.
  - `params["mode"]`:
      - "reconstruct" (default): reconstructions through the latent mean, (B, 3, H, W) in [-1, 1];
      - "encode": the latent means, (B, latent_dim);
      - "sample": `params["n"]` (default 16, at most serve.max_batch) prior samples, (n, 3, H, W), from `params["seed"]`
        (default 0); the input is validated but otherwise ignored. `params["sampler"]`:
        "default" the sampler the evaluation stored with the model (eval.sampler: N(0, T^2 I) or
        the Gaussian mixture on train latents, dfcvae/sampler.py; N(0, I) for models without one),
        "normal" N(0, I), or "gmm" (400 when the model has no mixture).
The signature's output schema describes the default mode. A caller's mistake is MLflow's
400 with one sentence; anything else is logged with its traceback on the server and answered
with one sentence too: no reply carries a stack trace.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import sys
import tempfile
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import torch
from mlflow.exceptions import MlflowException
from mlflow.models import Model, ModelSignature
from mlflow.models.model import ModelInfo
from mlflow.types.schema import ParamSchema, ParamSpec, Schema, TensorSpec

from dfcvae.checkpoint import REGISTERED_ARTIFACT, load_checkpoint, model_from_state
from dfcvae.config import ServeConfig
from dfcvae.device import default_device
from dfcvae.model import DFCVAE
from dfcvae.sampler import NormalSampler, load_sampler

# This module is imported wherever the pyfunc is loaded (a serving container): nothing of the
# training stack (data, the perceptual network, Ray) is imported here.

PREDICT_PARAMS = {"mode": "reconstruct", "n": 16, "seed": 0, "sampler": "default"}
SAMPLER_ARTIFACT = "sampler"
MODES = ("reconstruct", "encode", "sample")
BUNDLED_PACKAGE = Path(__file__).resolve().parent  # the dfcvae package, shipped with every registered model
INPUT_SLACK = 1e-3  # rounding in a client's scaling to [-1, 1]
log = logging.getLogger(__name__)


class VAEModel(mlflow.pyfunc.PythonModel):
    """DFC-VAE behind MLflow's pyfunc interface; see the module docstring for `predict`."""

    def load_context(self, context) -> None:
        checkpoint = Path(context.artifacts[REGISTERED_ARTIFACT])
        self.device = default_device()
        model_class = bundled_model_class(checkpoint.parent.parent)
        self.model, _ = model_from_state(load_checkpoint(checkpoint), self.device, model_class)
        stored = context.artifacts.get(SAMPLER_ARTIFACT)
        self.sampler = load_sampler(Path(stored)) if stored else None
        # The serve section of the config the model was registered with (config.json).
        registered = json.loads(Path(context.artifacts["config"]).read_text()) if "config" in context.artifacts else {}
        self.max_batch = int(registered.get("serve", {}).get("max_batch", ServeConfig.max_batch))

    def draw(self, params: dict[str, Any]) -> torch.Tensor:
        """Latent codes (n, latent_dim) for the sample mode, as params["sampler"] says."""
        name = params.get("sampler", "default")
        stored = getattr(self, "sampler", None)
        if name == "default":
            sampler = stored or NormalSampler(self.model.latent_dim)
        elif name == "normal":
            sampler = NormalSampler(self.model.latent_dim)
        elif name == "gmm" and stored is not None and stored.kind == "gmm":
            sampler = stored
        else:
            has = f"a {stored.kind} sampler" if stored else "no sampler"
            raise bad_input(f"params.sampler {name!r}: this model was registered with {has}; use default or normal.")
        return sampler.sample(self.count(params["n"]), torch.Generator().manual_seed(int(params["seed"])))

    def count(self, n: Any) -> int:
        """params.n as a count in [1, serve.max_batch], or a caller's mistake."""
        limit = getattr(self, "max_batch", ServeConfig.max_batch)
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or not 1 <= n <= limit:
            raise bad_input(f"params.n={n!r}: ask for 1 to {limit} samples (serve.max_batch) per request.")
        return int(n)

    # np.ndarray is a hint MLflow accepts without inferring a schema from it: the signature rules.
    def predict(self, context, model_input: np.ndarray, params: dict[str, Any] | None = None) -> np.ndarray:
        try:
            return self._predict(model_input, {**PREDICT_PARAMS, **(params or {})})
        except MlflowException:
            raise  # a caller's mistake, said in one sentence
        except Exception as err:  # a fault: its traceback goes to the server's log, not to the caller
            log.exception("predict failed")
            raise MlflowException(
                f"the model failed on this request ({type(err).__name__}); the server's log has the details."
            ) from None

    def _predict(self, model_input: Any, params: dict[str, Any]) -> np.ndarray:
        mode = params["mode"]
        if mode not in MODES:
            raise bad_input(f"params.mode {mode!r} is not one of {MODES}.")
        if mode == "sample":
            with torch.no_grad():
                return self.model.decode(self.draw(params).to(self.device)).float().cpu().numpy()
        x = torch.as_tensor(self.images(model_input), device=self.device)  # (B, 3, H, W)
        with torch.no_grad():
            out = self.model.encode(x)[0] if mode == "encode" else self.model.reconstruct(x)
        return out.float().cpu().numpy()

    def images(self, model_input: Any) -> np.ndarray:
        """Any input a caller may pass -> float32 (B, 3, H, W) in [-1, 1], or one sentence saying
        what is wrong: the same sentence over HTTP and through the Python API."""
        size, limit = self.model.image_size, getattr(self, "max_batch", ServeConfig.max_batch)
        expected = f"images of shape (B, 3, {size}, {size}) in [-1, 1]"
        if isinstance(model_input, torch.Tensor):
            model_input = model_input.detach().cpu().numpy()
        try:
            x = np.asarray(model_input)
        except (ValueError, TypeError):  # ragged nested lists
            raise bad_input(f"expected {expected}, got a ragged or mixed {type(model_input).__name__}.") from None
        if x.dtype == np.uint8 or (x.dtype.kind in "iu" and x.size and x.max() > 1):
            raise bad_input(f"expected {expected}, got {x.dtype} pixels (8-bit? send x / 127.5 - 1).")
        if x.dtype.kind not in "fiub":
            raise bad_input(f"expected {expected}, got {type(model_input).__name__} of {x.dtype}.")
        if x.ndim != 4 or tuple(x.shape[1:]) != (3, size, size):
            raise bad_input(f"expected {expected}, got shape {tuple(x.shape)}.")
        if not 1 <= len(x) <= limit:
            raise bad_input(f"send 1 to {limit} images per request (serve.max_batch), not {len(x)}.")
        x = x.astype(np.float32)  # float64 (numpy's default) holds [-1, 1] pixels at float32's precision
        if not np.isfinite(x).all():
            raise bad_input("the images hold NaN or infinite values: send finite pixels in [-1, 1].")
        low, high = float(x.min()), float(x.max())
        if low < -1 - INPUT_SLACK or high > 1 + INPUT_SLACK:
            hint = " (8-bit pixels? send x / 127.5 - 1)" if high > 2 else " (send 2 x - 1 for [0, 1] pixels)"
            raise bad_input(f"the images range over [{low:.3g}, {high:.3g}], not [-1, 1]{hint}.")
        return x


def bundled_model_class(model_dir: Path) -> type[DFCVAE]:
    """DFCVAE as the code this model was registered with defines it (<model_dir>/code/dfcvae/model.py),
    loaded under a module name of its own. Python imports `dfcvae` once per process, so without
    this two versions loaded side by side would both run whichever version's package came first.
    The importable dfcvae.model when the files bundle no code."""
    source = model_dir / "code" / "dfcvae" / "model.py"
    if not source.is_file():
        return DFCVAE
    name = f"_dfcvae_registered_{hashlib.sha256(source.read_bytes()).hexdigest()[:16]}"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, source)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name].DFCVAE


def bad_input(message: str) -> MlflowException:
    """A caller's mistake: MLflow's server answers 400 with this message (any other exception
    becomes its generic "unexpected error")."""
    return MlflowException.invalid_parameter_value(message)


def model_signature(example: np.ndarray) -> ModelSignature:
    """Images out (the default mode), any batch size, with the predict params. No input schema:
    `VAEModel.images` checks every input itself (module docstring)."""
    image = TensorSpec(np.dtype(np.float32), (-1, *example.shape[1:]), name=None)
    params = ParamSchema(
        [
            ParamSpec("mode", "string", PREDICT_PARAMS["mode"]),
            ParamSpec("n", "long", PREDICT_PARAMS["n"]),
            ParamSpec("seed", "long", PREDICT_PARAMS["seed"]),
            ParamSpec("sampler", "string", PREDICT_PARAMS["sampler"]),
        ]
    )
    return ModelSignature(inputs=None, outputs=Schema([image]), params=params)


def input_example(state: dict, n: int = 2) -> np.ndarray:
    """Seeded prior samples from the model itself: realistic, deterministic images."""
    model, _ = model_from_state(state, "cpu")
    return model.sample(n, torch.Generator().manual_seed(0)).numpy()  # (n, 3, H, W)


def log_model(
    state: dict,
    model_path: Path,
    metrics_path: Path,
    grids: list[Path],
    run_id: str,
    sampler: Path | None = None,
    serve: ServeConfig | None = None,
    extra: dict[str, Path] | None = None,
) -> ModelInfo:
    """Log the pyfunc model on `run_id` with its attachments (the evaluation's sampler file when
    given, `extra`: more pyfunc artifact name -> file) and the registering config's serve section;
    returns MLflow's ModelInfo (its models:/ URI and the logged model's id)."""
    example = input_example(state)
    with tempfile.TemporaryDirectory() as tmp:
        config_path = Path(tmp) / "config.json"
        stored = {**state["config"], "serve": dataclasses.asdict(serve or ServeConfig())}
        config_path.write_text(json.dumps(stored, indent=2, sort_keys=True) + "\n")
        # Attachments ride along as pyfunc artifacts: whoever downloads the version gets them.
        artifacts = {
            REGISTERED_ARTIFACT: str(model_path),
            "config": str(config_path),
            "metrics": str(metrics_path),
            **{f"grid_{grid.stem}": str(grid) for grid in grids},
            **({SAMPLER_ARTIFACT: str(sampler)} if sampler else {}),
            **{name: str(path) for name, path in (extra or {}).items()},
        }
        info = Model.log(
            artifact_path=None,
            name="model",
            flavor=mlflow.pyfunc,
            run_id=run_id,
            python_model=VAEModel(),
            artifacts=artifacts,
            code_paths=[str(BUNDLED_PACKAGE)],
            signature=model_signature(example),
            input_example=(example, PREDICT_PARAMS),
            pip_requirements=_requirements(),
            step=int(state.get("step", 0)),
        )
    return info


def _requirements() -> list[str]:
    import yaml

    # Local version labels (+cu130) are not on PyPI; the serving image picks its own build.
    return [
        f"torch=={torch.__version__.split('+')[0]}",
        f"numpy=={np.__version__}",
        f"pyyaml=={yaml.__version__}",
        f"mlflow=={mlflow.__version__}",
        f"safetensors=={importlib.metadata.version('safetensors')}",
    ]
