"""The serving formats of an export, and its model card (`inference.save_export` calls these).

  model.stablehlo  the eval forward as a serialised `jax.export.Exported` (structvit_jax/
                   serving.py loads it with jax + numpy only): uint8 input [N, *input_shape]
                   in the export's eval layout (resized, cropped, frames sampled), the
                   normalisation model.json records inside, float32 logits [N, classes] out;
                   N symbolic; lowered for cpu, cuda and tpu.
  model.onnx       the same function through jax2onnx (`--onnx`; pip install
                   structvit_jax[onnx]), checked with onnxruntime when written.
  README.md        the model card (`model_card`).

Formulations. The StableHLO forward picks them per platform where it is compiled
(`jax.lax.platform_dependent`): on cpu the shift-add depthwise convolutions and the einsum
attention, as the Predictor on XLA:CPU (docs/platform_notes.md); on cuda and tpu
convolutions and XLA's attention (the cuDNN / Pallas kernels lower for one platform only).
ONNX gets convolutions, XLA's attention and StructSA's fused form: what jax2onnx converts
and onnxruntime runs (docs/serving.md, "ONNX").
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from structvit_jax import paths
from structvit_jax.serving import STABLEHLO_FILE

ONNX_FILE = "model.onnx"
CARD_FILE = "README.md"
PLATFORMS = ("cpu", "cuda", "tpu")
ONNX_OPSET = 23
ONNX_ATOL = 1e-4  # onnxruntime vs the JAX forward, on a random uint8 batch at export time


class ServingExportError(RuntimeError):
  """A serving format that could not be written or did not check out; says which and why."""


def input_shape(spec: dict[str, Any]) -> tuple[int, ...]:
  hw = (spec["image_size"], spec["image_size"], 3)
  return hw if spec["kind"] == "image" else (spec["num_frames"], *hw)


def serving_model(model: Any, depthwise_impl: str, form: str | None = None,
                  attention_impl: str = "xla") -> Any:
  """`model` with the kernels a serving artefact needs: a portable attention formulation
  (XLA's, or the einsum one), the given depthwise formulation (and StructSA form), no remat.
  Parameters and results are unchanged."""
  fields = {f.name for f in dataclasses.fields(model)}
  changes: dict[str, Any] = {}
  if "structsa" in fields:
    changes["structsa"] = model.structsa.replace(
        attention_impl=attention_impl, depthwise_impl=depthwise_impl,
        **({"form": form} if form else {}))
  if "attention_impl" in fields:
    changes["attention_impl"] = attention_impl
  if "remat" in fields:
    changes["remat"] = False
  return model.clone(**changes)


def eval_forward(model: Any, variables: Any, spec: dict[str, Any]) -> Callable:
  """uint8 [N, *input_shape] -> float32 logits: the eval pipeline's normalisation
  (data/ops.py Normalize: same constants, same order of operations), then the model.
  `variables` are closed over (constants of an exported function)."""
  mean = np.asarray(spec["mean"], np.float32) * 255.0
  scale = 1.0 / (np.asarray(spec["std"], np.float32) * 255.0)

  def forward(x):
    x = (x.astype(jnp.float32) - mean) * scale
    return model.apply(variables, x, train=False).astype(jnp.float32)

  return forward


def stablehlo_forward(model: Any, variables: Any, spec: dict[str, Any]) -> Callable:
  """The StableHLO artefact's function, with the formulations `inference.load` runs where it
  is compiled (`jax.lax.platform_dependent`): on cpu the depthwise convolutions as
  shift-adds and the einsum attention (the CPU choices of layers.py and attention.py),
  elsewhere convolutions and XLA's attention (the cuDNN / Pallas kernels do not lower for
  other platforms)."""
  on_cpu = eval_forward(serving_model(model, "shift", attention_impl="einsum"), variables,
                        spec)
  elsewhere = eval_forward(serving_model(model, "xla"), variables, spec)
  return lambda x: jax.lax.platform_dependent(x, cpu=on_cpu, default=elsewhere)


def write_stablehlo(out_dir: str, model: Any, variables: Any, spec: dict[str, Any],
                    platforms: Sequence[str] = PLATFORMS) -> dict[str, Any]:
  """Writes OUT_DIR/model.stablehlo; returns what the model card and model.json record."""
  start = time.perf_counter()
  variables = jax.device_put(variables, jax.devices("cpu")[0])  # constants, whatever device
  fn = jax.jit(stablehlo_forward(model, variables, spec))
  batch = jax.export.symbolic_shape("N")
  arg = jax.ShapeDtypeStruct((*batch, *input_shape(spec)), jnp.uint8)
  exported = jax.export.export(fn, platforms=tuple(platforms))(arg)
  blob = exported.serialize()
  paths.write_bytes(os.path.join(out_dir, STABLEHLO_FILE), bytes(blob))
  return {"file": STABLEHLO_FILE, "bytes": len(blob), "platforms": list(exported.platforms),
          "input": {"dtype": "uint8", "shape": ["N", *input_shape(spec)]},
          "calling_convention_version": exported.calling_convention_version,
          "jax_version": jax.__version__, "seconds": round(time.perf_counter() - start, 2)}


# ----------------------------------------------------------------------------- ONNX


@functools.cache
def _jax2onnx():
  """jax2onnx, quietened, with 3-D convolutions: its conv plugin (0.17) knows only 1-D / 2-D
  layouts, and the video models' tubelet embeddings and depthwise convolutions are 3-D
  (NDHWC, DHWIO). ONNX Conv is N-D and the plugin's lowering is layout-string generic, so
  the 3-D layouts are added to its tables (docs/serving.md, "ONNX")."""
  try:
    import jax2onnx
    import onnxruntime  # noqa: F401  (the check needs it: fail before converting)
  except ImportError as e:
    raise ServingExportError(f"--onnx needs jax2onnx and onnxruntime ({e}); pip install "
                             f"'structvit_jax[onnx]' (README.md, 'Serving')") from None
  # Its plugin discovery imports every plugin and example, logging a traceback for each
  # that needs an absent optional library (equinox, dm_pix); ours need none of them.
  for name in ("jax2onnx", "onnx_ir"):
    logging.getLogger(name).setLevel(logging.ERROR)
  try:
    from jax2onnx.plugins.jax.lax import conv
    _add_3d_conv_layouts(conv)
  except (ImportError, AttributeError):  # another jax2onnx: 3-D convs as it converts them
    pass
  return jax2onnx


def _add_3d_conv_layouts(conv: Any) -> None:
  conv._LAYOUT_MAP.setdefault((0, 4, 1, 2, 3), "NDHWC")
  conv._LAYOUT_MAP.setdefault((0, 1, 2, 3, 4), "NCDHW")
  conv._OUTPUT_LAYOUT_MAP.setdefault((0, 4, 1, 2, 3), "NDHWC")
  conv._OUTPUT_LAYOUT_MAP.setdefault((0, 1, 2, 3, 4), "NCDHW")
  conv._FILTER_LAYOUT_MAP.setdefault((4, 3, 0, 1, 2), "DHWIO")
  conv._FILTER_LAYOUT_MAP.setdefault((0, 1, 2, 3, 4), "OIDHW")
  canonical_input, canonical_kernel = conv._canonical_input_layout, conv._canonical_kernel_layout
  if not getattr(canonical_input, "_structvit_3d", False):
    def input_layout(layout):
      return "NCDHW" if len(layout) == 5 else canonical_input(layout)

    def kernel_layout(layout, *, is_transpose):
      if len(layout) == 5:
        return "IODHW" if is_transpose else "OIDHW"
      return canonical_kernel(layout, is_transpose=is_transpose)

    input_layout._structvit_3d = True
    conv._canonical_input_layout, conv._canonical_kernel_layout = input_layout, kernel_layout


def onnx_forward(model: Any, variables: Any, spec: dict[str, Any]) -> Callable:
  """The ONNX artefact's function: depthwise convolutions as convolutions (jax2onnx cannot
  convert the shift-add form's lax.pad under a symbolic batch) and StructSA's fused form
  (the reference form converts, but onnxruntime dies on it: docs/serving.md)."""
  return eval_forward(serving_model(model, "xla", form="fused"), variables, spec)


def write_onnx(out_dir: str, model: Any, variables: Any, spec: dict[str, Any],
               model_name: str = "model") -> dict[str, Any]:
  """Writes OUT_DIR/model.onnx and checks it with onnxruntime against the JAX forward on a
  random uint8 batch of 2 (ServingExportError beyond ONNX_ATOL); returns the record."""
  if paths.is_remote(out_dir):  # jax2onnx and onnxruntime work on local files
    import tempfile
    with tempfile.TemporaryDirectory() as tmp:
      record = write_onnx(tmp, model, variables, spec, model_name)
      for f in record["files"]:
        paths.copy_file(os.path.join(tmp, f), os.path.join(out_dir, f))
      return record
  jax2onnx = _jax2onnx()
  import onnxruntime as ort
  start = time.perf_counter()
  variables = jax.device_put(variables, jax.devices("cpu")[0])
  fn = onnx_forward(model, variables, spec)
  arg = jax.ShapeDtypeStruct((*jax.export.symbolic_shape("N"), *input_shape(spec)), jnp.uint8)
  path = os.path.join(out_dir, ONNX_FILE)
  try:
    jax2onnx.to_onnx(fn, [arg], model_name=model_name, opset=ONNX_OPSET,
                     input_names=["input"], output_names=["logits"], return_mode="file",
                     output_path=path)
  except Exception as e:  # noqa: BLE001  (the converter's errors have no common type)
    raise ServingExportError(f"jax2onnx could not convert {model_name}: "
                             f"{type(e).__name__}: {str(e)[:500]}") from e
  seconds = time.perf_counter() - start
  x = np.random.default_rng(0).integers(0, 256, (2, *input_shape(spec)), dtype=np.uint8)
  options = ort.SessionOptions()
  options.log_severity_level = 3  # not its notes on the initializers it prunes
  session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
  got = session.run(None, {"input": x})[0]
  want = np.asarray(jax.jit(fn)(x))
  diff = float(np.max(np.abs(got - want)))
  if not diff <= ONNX_ATOL * max(1.0, float(np.max(np.abs(want)))):
    raise ServingExportError(f"{path}: onnxruntime's logits differ from JAX's by {diff:.3g}")
  files = [ONNX_FILE] + sorted(f for f in os.listdir(out_dir) if f.startswith(ONNX_FILE + "."))
  return {"file": ONNX_FILE, "files": files,
          "bytes": sum(os.path.getsize(os.path.join(out_dir, f)) for f in files),
          "opset": ONNX_OPSET, "input": {"name": "input", "dtype": "uint8",
                                         "shape": ["N", *input_shape(spec)]},
          "output": "logits", "onnxruntime_max_abs_diff": diff,
          "onnxruntime_version": ort.__version__, "jax2onnx_version": getattr(
              jax2onnx, "__version__", None) or _dist_version("jax2onnx"),
          "seconds": round(seconds, 2)}


def _dist_version(name: str) -> str:
  from importlib import metadata
  try:
    return metadata.version(name)
  except metadata.PackageNotFoundError:
    return "unknown"


# ----------------------------------------------------------------------------- model card


def model_stats(model: Any, variables: Any, spec: dict[str, Any]) -> dict[str, Any]:
  """Parameters and GMACs ("GFLOPs" as the papers count them, docs/flops.md) per example."""
  from structvit_jax import flops
  macs = flops.count_model_macs(model, input_shape(spec), variables=variables)["total"]
  fields = {f.name for f in dataclasses.fields(model)}
  variant = [f"{type(model).__name__}"]
  for name in ("depth", "embed_dim", "num_heads", "head_dim", "patch_size", "attention_type",
               "num_frames", "img_size", "dtype"):
    if name in fields and getattr(model, name) is not None:
      value = getattr(model, name)
      variant.append(f"{name}={jnp.dtype(value).name if name == 'dtype' else value}")
  if "structsa" in fields:
    c = model.structsa
    variant.append(f"StructSA D={c.d} S={c.stride} M={c.kernel_size} {c.aggregation} "
                   f"({c.form} form)" if c.d else "self-attention (no StructSA)")
  return {"params": flops.count_params(variables["params"]), "gflops": macs / 1e9,
          "variant": ", ".join(variant)}


def _size(n: int) -> str:
  return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 2**10:.1f} KiB"


def _origin(meta: dict[str, Any], provenance: dict[str, Any]) -> list[str]:
  """The model card's Origin section: the training run or the converted checkpoint."""
  lines = ["## Origin", ""]
  if "converted_from" in provenance:
    lines += [f"Converted from the official checkpoint `{provenance['converted_from']}`"
              + (f" (sha256 {provenance['sha256']})" if provenance.get("sha256") else "")
              + " by `python -m structvit_jax.convert`; not trained or evaluated here.", ""]
  elif "workdir" in provenance:
    top1 = provenance.get("eval_top1")
    lines += [
        f"- training run: `{provenance['workdir']}`, dataset {provenance.get('dataset', '?')}"
        f", {provenance.get('planned', '?')} planned",
        f"- exported: step {provenance['step']}, "
        + ("EMA weights" if provenance.get("ema") else "raw (non-EMA) weights"),
        f"- last eval top-1 (eval_results.jsonl, {provenance.get('eval_key', '')} at step "
        f"{provenance.get('eval_step')}): {top1:.4f}" if top1 is not None else
        "- last eval top-1: none recorded (no eval_results.jsonl record)", ""]
  else:
    lines += [f"{meta.get('source') or 'not recorded'}", ""]
  return lines


def _serving_files(serving: dict[str, Any], files: dict[str, int]) -> list[str]:
  """The model card's Files table, command line and Notes on the serving artefacts."""
  lines = ["## Files", "", "| format | files | size | load with |", "|---|---|---|---|",
           f"| Flax / Orbax | `params/`, `model.json` | {_size(files.get('params', 0))} | "
           "`structvit_jax.inference.load(DIR).predict(files)` (this package, Flax) |"]
  notes = []
  if "stablehlo" in serving:
    s = serving["stablehlo"]
    lines.append(
        f"| StableHLO (jax.export) | `{s['file']}` | {_size(s['bytes'])} | "
        "`structvit_jax.serving.load(DIR)(x)` (jax + numpy only), or "
        f"`jax.export.deserialize(open('DIR/{s['file']}', 'rb').read()).call(x)` |")
    notes.append(f"- model.stablehlo: lowered for {', '.join(s['platforms'])} with jax "
                 f"{s['jax_version']} (calling convention {s['calling_convention_version']}); "
                 "best run with that jaxlib, newer ones within jax.export's compatibility "
                 "window. Not run at export; the project's tests "
                 "check its cpu lowering against the Flax model (cuda and tpu: lowered only).")
  if "onnx" in serving:
    o = serving["onnx"]
    lines.append(
        f"| ONNX (opset {o['opset']}) | {', '.join(f'`{f}`' for f in o['files'])} | "
        f"{_size(o['bytes'])} | `onnxruntime.InferenceSession('DIR/{o['file']}')"
        ".run(None, {'input': x})[0]` |")
    notes.append(f"- model.onnx: jax2onnx {o['jax2onnx_version']}; onnxruntime "
                 f"{o['onnxruntime_version']} (CPU) agreed with JAX to "
                 f"{o['onnxruntime_max_abs_diff']:.2g} (max abs logit) when written.")
  lines += ["", "Command line (any format's model): `python -m structvit_jax.predict "
            "--model=DIR [--backend=stablehlo] FILE...`.", ""]
  if notes:
    lines += ["## Notes", "", *notes, ""]
  return lines


def model_card(meta: dict[str, Any], stats: dict[str, Any], provenance: dict[str, Any],
               files: dict[str, int]) -> str:
  """The README.md of an export. meta: model.json's content (with its 'serving' records);
  provenance: the training run ('workdir', 'step', 'ema', 'dataset', 'planned',
  'eval_top1', 'eval_step') or the converted checkpoint ('converted_from', 'sha256')."""
  spec, serving = meta["input"], meta.get("serving", {})
  shape = input_shape(spec)
  video = spec["kind"] == "video"
  n_classes = meta["kwargs"].get("num_classes")
  kwargs = ", ".join(f"{k}={v!r}" for k, v in sorted(meta["kwargs"].items())) or "none"
  per = "per clip (one view)" if video else "per image"
  lines = [
      f"# {meta['model']}", "",
      "An inference export of structvit_jax (model card written with the export).", "",
      "| | |", "|---|---|",
      f"| model | `{meta['model']}` (structvit_jax.models preset) |",
      f"| variant | {stats.get('variant', '')} |",
      f"| overrides of the preset | {kwargs} |",
      f"| parameters | {stats['params']:,} |",
      f"| GFLOPs {per} | {stats['gflops']:.4g} (multiply-adds, docs/flops.md) |",
      f"| classes | {n_classes}" + (" (names in model.json)" if meta.get("class_names")
                                    else "") + " |",
      ""]
  lines += _origin(meta, provenance)
  lines += ["## Eval preprocessing", ""]
  norm = f"x / 255, minus mean {spec['mean']}, divided by std {spec['std']} (per RGB channel)"
  if video:
    lines += [f"- {spec['num_frames']} frames, {spec['sampling']} sampling, rate "
              f"{spec['sampling_rate']}; short side resized, centre crop "
              f"{spec['image_size']}x{spec['image_size']} (structvit_jax/data/video.py)",
              f"- evaluation averages the softmax over {spec.get('test_clips', 1)} clips x "
              f"{spec.get('test_crops', 1)} crops per video (`predict --views`)"]
  else:
    lines += [f"- resize the short side to {spec['image_size']} / {spec['crop_ratio']} "
              f"(bicubic), centre crop {spec['image_size']}x{spec['image_size']} (timm eval)"]
  lines += [f"- normalisation: {norm}; inside model.stablehlo and model.onnx, which take "
            "the uint8 pixels", ""]
  layout = "[N, T, H, W, 3]" if video else "[N, H, W, 3]"
  lines += ["## Input / output", "",
            f"- serving artefacts: input uint8 {layout} = [N, {', '.join(map(str, shape))}]"
            " RGB, preprocessed as above except the normalisation; N (batch) is free",
            "- Orbax params (Flax): float32 normalised inputs of the same shape "
            "(`Predictor.logits`), or files via `Predictor.predict`",
            f"- output: float32 logits [N, {n_classes}] (softmax for probabilities)", ""]
  return "\n".join(lines + _serving_files(serving, files))
