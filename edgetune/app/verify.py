"""``edgetune verify``: every hash of an app directory, and that each adapter's tensors are
inputs of the base model with the same names, types and shapes (plain onnxruntime and
onnxruntime-genai both checked); ``--base`` names a base elsewhere and says whose adapters these are."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from edgetune.formats import atomic as _io
from edgetune.formats.appdir import GENAI_CONFIG, MANIFEST, match_inputs, read_adapter, read_manifest
from edgetune.formats.errors import BundleError


def _session_io(path: Path) -> tuple[dict[str, tuple[str, list[Any]]], list[str]]:
    """The base's inputs (adapter weights included) and output names."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    # Only the signature is read: no graph optimization (also avoids a crash of
    # onnxruntime 1.23's full-level optimizer on this graph).
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    try:
        sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    except Exception as e:  # noqa: BLE001 - a damaged model is reported, not raised
        raise BundleError(f"{path} cannot be loaded by onnxruntime ({str(e).splitlines()[0][:160]}); "
                          "copy the app directory again or re-run edgetune pack") from None
    # Inputs with a default (every adapter weight) are "overridable initializers" to ORT.
    ins = {i.name: (i.type, list(i.shape)) for i in [*sess.get_inputs(), *sess.get_overridable_initializers()]}
    return ins, [o.name for o in sess.get_outputs()]


def _check_genai(appdir: Path, ins: dict[str, Any], outs: list[str], problems: list[str]) -> None:
    """``genai_config.json`` must describe the base it sits beside, or onnxruntime-genai fails at run time."""
    path = appdir / GENAI_CONFIG
    try:
        cfg = json.loads(path.read_text())
        dec, model = cfg["model"]["decoder"], cfg["model"]
        names = (dec["inputs"]["input_ids"], dec["inputs"]["attention_mask"], dec["inputs"]["position_ids"])
        layers, pk, pv = int(dec["num_hidden_layers"]), dec["inputs"]["past_key_names"], dec["inputs"]["past_value_names"]
        ok, vk, vv = dec["outputs"]["logits"], dec["outputs"]["present_key_names"], dec["outputs"]["present_value_names"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        problems.append(f"{GENAI_CONFIG} is not a usable onnxruntime-genai config ({type(e).__name__}: {e}); "
                        "re-run edgetune pack")
        return
    from edgetune.formats import safety

    safety.inside(appdir, dec.get("filename", ""), "genai decoder file")
    if not (appdir / dec.get("filename", "")).is_file():
        problems.append(f"{GENAI_CONFIG}: decoder file {dec.get('filename')!r} is not in {appdir}")
    want_in = [*names, *(p % i for i in range(layers) for p in (pk, pv))]
    want_out = [ok, *(p % i for i in range(layers) for p in (vk, vv))]
    missing = [n for n in want_in if n not in ins] + [n for n in want_out if n not in outs]
    if missing:
        problems.append(f"{GENAI_CONFIG} names {len(missing)} tensor(s) the base model does not have, e.g. {missing[0]}")
    extra_layers = sum(1 for n in ins if n.startswith("past_key_values.") and n.endswith(".key")) - layers
    if extra_layers:
        problems.append(f"{GENAI_CONFIG}: num_hidden_layers is {layers}, the base model has {layers + extra_layers}")
    past = ins.get(pk % 0)
    if past and isinstance(past[1][1], int) and past[1][1] != dec.get("num_key_value_heads"):
        problems.append(f"{GENAI_CONFIG}: num_key_value_heads is {dec.get('num_key_value_heads')}, the base has {past[1][1]}")
    if past and isinstance(past[1][3], int) and past[1][3] != dec.get("head_size"):
        problems.append(f"{GENAI_CONFIG}: head_size is {dec.get('head_size')}, the base has {past[1][3]}")
    if model.get("eos_token_id") is None:
        problems.append(f"{GENAI_CONFIG}: no eos_token_id; generation would never stop")


def verify(appdir: str | Path, base: str | Path | None = None) -> dict[str, Any]:
    """Check every hash and every adapter tensor against the base; all problems in one error."""
    appdir = Path(appdir)
    m = read_manifest(appdir)
    problems: list[str] = []
    for f, digest in m.get("files", {}).items():
        if not (appdir / f).is_file():
            problems.append(f"{f} is missing")
        elif _io.sha256_file(appdir / f) != digest:
            problems.append(f"{f} does not match its sha256 in the manifest")
    base_path = Path(base) if base else appdir / "base.onnx"
    if base is not None:
        _check_other_base(m, base_path, problems)
    base_ok = base_path.is_file() and not any(
        p.startswith(("base.onnx", f"base model {base_path}", "these adapters were made for")) for p in problems)
    inputs, outputs = {}, []
    if base_ok:
        try:
            inputs, outputs = _session_io(base_path)
        except BundleError as e:
            problems.append(str(e))
    if inputs and GENAI_CONFIG in m.get("files", {}):
        _check_genai(appdir, inputs, outputs, problems)
    elif GENAI_CONFIG not in m.get("files", {}):
        problems.append(f"{GENAI_CONFIG} is not listed: onnxruntime-genai cannot open this directory; "
                        "pack it again with this edgetune")
    checked = 0
    for name, entry in m.get("adapters", {}).items():
        f = appdir / entry["file"]
        if not f.is_file():
            problems.append(f"adapter {name}: {entry['file']} is missing")
            continue
        if _io.sha256_file(f) != entry["sha256"]:
            problems.append(f"adapter {name}: {entry['file']} does not match its sha256")
            continue
        params = read_adapter(f)["parameters"]
        checked += len(params)
        if inputs:
            problems += match_inputs(name, params, inputs)
    if problems:
        raise BundleError(f"{appdir} failed verification:\n  - " + "\n  - ".join(problems))
    return {"appdir": str(appdir), "base": str(base_path), "adapters": sorted(m.get("adapters", {})),
            "tensors_checked": checked, "ok": True}


def _check_other_base(m: dict[str, Any], base_path: Path, problems: list[str]) -> None:
    if not base_path.is_file():
        problems.append(f"base model {base_path} not found")
        return
    if _io.sha256_file(base_path) == m["base_sha256"]:
        return
    other = "an unknown model"
    om = base_path.parent / MANIFEST
    if om.is_file():
        try:
            ob = read_manifest(base_path.parent).get("base", {})
        except BundleError:
            ob = {"source": f"a model whose {MANIFEST} is damaged", "bundle_base_id": "?"}
        other = f"{ob.get('source')} (id {str(ob.get('bundle_base_id'))[:12]})"
    mine = m.get("base", {})
    problems.append(f"these adapters were made for {mine.get('source')} (id {str(mine.get('bundle_base_id'))[:12]}, "
                    f"base.onnx sha256 {m['base_sha256'][:12]}), but {base_path} is {other} "
                    f"(sha256 {_io.sha256_file(base_path)[:12]})")
