"""python -m gain_mlx.export: gains folded into a copy of a GGUF, checked with gguf-py.

Tiny llama GGUFs are written by ``gguf_fixtures`` (llama.cpp's layout, gguf-py's
writer), adapters by the core (``apply_gains`` / ``save_adapter``). The patched file is
read back with gguf-py's own ``GGUFReader`` and dequantizers: patched tensors must equal
``s * dequantize(original)`` (gains read straight from the adapter, not from the fold
plan), every other byte must be unchanged. The real-model test runs llama.cpp on the
patched SmolLM2 Q4_1 against the MLX model with the same gains applied.
"""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from gguf import GGMLQuantizationType as T
from gguf import GGUFReader
from gguf import quants as gq

from gain_mlx.adapter import adapter_config, apply_gains, save_adapter
from gain_mlx.export import main as export_main
from gain_mlx.gguf import quants as Q
from gain_mlx.gguf.export import ExportError, export_gguf, rewrite
from gain_mlx.gguf.header import GGUFFile
from gain_mlx.layers import GAIN_LAYERS
from gguf_fixtures import field_mask, kl_top1, tiny_for_gguf, write_gguf, write_random_gguf

SIZES = dict(hidden_size=256, intermediate_size=512)  # K-quant blocks need 256 columns
ROUNDING = {"f16": 2.0**-11, "f16_nibbles": 2.0**-11, "bf16": 2.0**-8, "f32": 2.0**-24, "e8m0": 0.0}


def make_adapter(path, model, tie_kv=True, draw="uniform", seed=0, fingerprint=False):
    """An adapter folder for ``model`` with random gains (U(0.6, 1.4) or powers of two).

    ``fingerprint=False`` drops the base fingerprint, so one adapter fits every random
    GGUF of the same shape (the fingerprint check has its own tests).
    """
    targets = apply_gains(model, "gain-ffn", tie_kv)
    rng = np.random.default_rng(seed)
    for _, layer in model.named_modules():
        if isinstance(layer, GAIN_LAYERS):
            shape = layer.gain.shape
            g = rng.uniform(0.6, 1.4, shape) if draw == "uniform" else rng.choice([0.5, 1.0, 2.0], shape)
            layer.gain = mx.array(g.astype(np.float32))
    config = adapter_config(model, targets, "gain-ffn", tie_kv)
    if not fingerprint:
        config["fingerprint"] = None
    return save_adapter(model, path, config)


def stored_gains(adapter):
    return {k[: -len(".gain")]: np.array(v) for k, v in mx.load(str(Path(adapter) / "gains.safetensors")).items()}


def row_factors(adapter, n_layers=2):
    """Where the gains must land, read straight from the adapter: FFN-down gains on the
    ffn_up rows; KV-tied attention gains (n_kv, head_dim) on the attn_v rows k*hd+d."""
    g = stored_gains(adapter)
    out = {}
    for i in range(n_layers):
        out[f"blk.{i}.ffn_up.weight"] = ("rows", g[f"model.layers.{i}.mlp.down_proj"])
        out[f"blk.{i}.attn_v.weight"] = ("rows", g[f"model.layers.{i}.self_attn.o_proj"].reshape(-1))
    return out


def values(t):
    data = np.asarray(t.data)
    if t.tensor_type in (T.F32, T.F16):
        return data.astype(np.float32)
    return gq.dequantize(data, t.tensor_type)


def compare(base, out, factors, same_layout=True, requantized=()):
    """Check ``out`` against ``base`` with gguf-py; returns {tensor: relative error}."""
    a, b = GGUFReader(base), GGUFReader(out)
    if same_layout:
        same_header(a, b)
    new = {t.name: t for t in b.tensors}
    errors = {}
    for t in a.tensors:
        u = new[t.name]
        if t.name not in factors:
            assert np.array_equal(np.asarray(t.data).view(np.uint8), np.asarray(u.data).view(np.uint8)), t.name
            continue
        axis, f = factors[t.name]
        want = values(t) * {"rows": f[:, None], "columns": f[None, :], "elements": f}[axis]
        got = values(u)
        errors[t.name] = float(np.linalg.norm(got - want) / np.linalg.norm(want))
        if same_layout and t.tensor_type == u.tensor_type and t.name not in requantized:
            raw_a, raw_b = np.asarray(t.data).view(np.uint8), np.asarray(u.data).view(np.uint8)
            outside = np.tile(~field_mask(t.tensor_type), raw_a.shape[-1] // len(field_mask(t.tensor_type)))
            assert np.array_equal(raw_a[..., outside], raw_b[..., outside]), t.name
    return errors


def same_header(a, b):
    """``b`` has ``a``'s metadata (plus gain_mlx.* keys), tensor table and data size."""
    mine = {k for k in b.fields if not k.startswith(("GGUF.", "gain_mlx."))}
    assert mine == {k for k in a.fields if not k.startswith(("GGUF.", "gain_mlx."))}
    for k in mine:
        assert b.get_field(k).contents() == a.get_field(k).contents(), k
    for t, u in zip(a.tensors, b.tensors, strict=True):
        assert (t.name, t.tensor_type, list(t.shape)) == (u.name, u.tensor_type, list(u.shape))
        assert t.data_offset - a.data_offset == u.data_offset - b.data_offset, t.name
    assert len(a.data) - a.data_offset == len(b.data) - b.data_offset
    assert (b.data_offset - a.data_offset) % 4096 == 0  # data keep their page offset


def leftovers(folder):
    return [p.name for p in Path(folder).iterdir() if ".tmp-" in p.name]


# --- exact folds, every type ----------------------------------------------------------

def column_factors(adapter, n_layers=2, repeats=2):
    """Float GGUFs: gains go on the targets' columns; query head h reads KV head h // repeats."""
    g = stored_gains(adapter)
    out = {}
    for i in range(n_layers):
        out[f"blk.{i}.ffn_down.weight"] = ("columns", g[f"model.layers.{i}.mlp.down_proj"])
        tied = g[f"model.layers.{i}.self_attn.o_proj"]
        out[f"blk.{i}.attn_output.weight"] = ("columns", np.repeat(tied, repeats, axis=0).reshape(-1))
    return out


@pytest.mark.parametrize("qtype", list(Q.SCALES), ids=lambda t: t.name)
def test_every_type_folds_exactly(tmp_path, qtype):
    """Quantized types: scale fields of the producer rows. Float types: target columns."""
    model = tiny_for_gguf("llama", **SIZES)
    if qtype in Q.FLOAT_TYPES:
        base = write_gguf(tmp_path / "base.gguf", model, qtype)
    else:
        base = write_random_gguf(tmp_path / "base.gguf", model, qtype)
    draw = "pow2" if Q.SCALES[qtype].kind == "e8m0" else "uniform"
    adapter = make_adapter(tmp_path / "adapter", tiny_for_gguf("llama", **SIZES), draw=draw)
    report = export_gguf(base, adapter, tmp_path / "out.gguf", fallback="refuse", log=lambda s: None)
    axis = "columns" if qtype in Q.FLOAT_TYPES else "rows"
    assert {r["how"] for r in report} == {"scales"} and {r["axis"] for r in report} == {axis}
    factors = column_factors(adapter) if axis == "columns" else row_factors(adapter)
    errors = compare(base, tmp_path / "out.gguf", factors)
    tol = 4 * ROUNDING[Q.SCALES[qtype].kind]
    print(f"{qtype.name}: max relative error {max(errors.values()):.2e}")
    assert max(errors.values()) <= tol, errors
    # the export's own measurement agrees with the independent one
    for r in report:
        assert r["rel_err"] == pytest.approx(errors[r["tensor"]], rel=0.5, abs=1e-7)


def test_module_paths_map_through_gguf_py(tmp_path):
    from gain_mlx.gguf.export import gguf_tensor, tensor_name_map

    base = write_random_gguf(tmp_path / "base.gguf", tiny_for_gguf("llama", **SIZES), T.Q4_0)
    f = GGUFFile(base)
    table = tensor_name_map(f)
    assert gguf_tensor(f, table, "model.layers.1.self_attn.v_proj").name == "blk.1.attn_v.weight"
    assert gguf_tensor(f, table, "model.layers.0.mlp.up_proj").name == "blk.0.ffn_up.weight"
    assert gguf_tensor(f, table, "model.layers.0.mlp.up_proj", ".bias") is None


def test_header_parser_matches_gguf_py(tmp_path):
    base = write_random_gguf(tmp_path / "base.gguf", tiny_for_gguf("llama", **SIZES), T.Q4_K)
    mine, ref = GGUFFile(base), GGUFReader(base)
    assert [t.name for t in mine.tensors] == [t.name for t in ref.tensors]
    for a, b in zip(mine.tensors, ref.tensors):
        assert (a.tensor_type, a.data_offset, a.n_bytes) == (b.tensor_type, b.data_offset, b.n_bytes)
        assert tuple(a.shape) == tuple(int(d) for d in b.shape)
    assert list(mine.fields) == [k for k in ref.fields if not k.startswith("GGUF.")]
    assert mine.value("llama.block_count") == ref.get_field("llama.block_count").contents()
    assert len(ref.fields["tokenizer.ggml.tokens"].data) > 500  # a string array, skipped by length
    for key, field in mine.fields.items():  # every record starts where gguf-py's does
        assert field.offset == ref.fields[key].offset, key


def test_rewrite_without_changes_is_byte_identical(tmp_path):
    base = write_random_gguf(tmp_path / "base.gguf", tiny_for_gguf("llama", **SIZES), T.Q4_1)
    rewrite(GGUFFile(base), tmp_path / "copy.gguf", {})
    assert (tmp_path / "copy.gguf").read_bytes() == base.read_bytes()


@pytest.mark.parametrize("without", [("copy_file_range",), ("copy_file_range", "sendfile")])
def test_rewrite_falls_back_when_the_kernel_cannot_copy(tmp_path, monkeypatch, without):
    """copy_file_range refused (EXDEV: another file system), then sendfile (ENOSYS): the
    next way takes over and the copy is still byte for byte."""
    import errno
    import os

    base = write_random_gguf(tmp_path / "base.gguf", tiny_for_gguf("llama", **SIZES), T.Q4_1)
    for name, code in zip(without, (errno.EXDEV, errno.ENOSYS)):
        if hasattr(os, name):
            monkeypatch.setattr(os, name, lambda *a, code=code: (_ for _ in ()).throw(OSError(code, "refused")))
    rewrite(GGUFFile(base), tmp_path / "copy.gguf", {})
    assert (tmp_path / "copy.gguf").read_bytes() == base.read_bytes()


# --- untied GQA attention gains on a K-quant target: the fallbacks --------------------

@pytest.fixture
def gqa_untied(tmp_path):
    """Q4_K (written raw) tiny llama with 4 query / 2 KV heads and untied attention gains."""
    base = write_random_gguf(tmp_path / "base.gguf", tiny_for_gguf("llama", **SIZES), T.Q4_K)
    adapter = make_adapter(tmp_path / "adapter", tiny_for_gguf("llama", **SIZES), tie_kv=False)
    g = stored_gains(adapter)
    factors = {}
    for i in range(2):
        factors[f"blk.{i}.ffn_up.weight"] = ("rows", g[f"model.layers.{i}.mlp.down_proj"])
        factors[f"blk.{i}.attn_output.weight"] = ("columns", g[f"model.layers.{i}.self_attn.o_proj"])
    return base, adapter, factors


def test_refuse_suggests_tie_kv(gqa_untied, tmp_path):
    base, adapter, _ = gqa_untied
    with pytest.raises(SystemExit) as e:
        export_main(["--gguf", str(base), "--adapter-path", str(adapter), "--out", str(tmp_path / "o.gguf"),
                     "--fallback", "refuse"])
    msg = str(e.value)
    assert "--tie-kv" in msg and "attn_output" in msg and "\n" not in msg
    assert not (tmp_path / "o.gguf").exists() and not leftovers(tmp_path)


def test_requant_of_a_type_gguf_py_cannot_quantize_is_refused(gqa_untied, tmp_path):
    base, adapter, _ = gqa_untied
    with pytest.raises(ExportError, match="cannot quantize Q4_K.*--fallback auto"):
        export_gguf(base, adapter, tmp_path / "o.gguf", fallback="requant", log=lambda s: None)
    assert not (tmp_path / "o.gguf").exists() and not leftovers(tmp_path)


@pytest.mark.parametrize("fallback,new_type,tol", [("f16", T.F16, 2.0**-10), ("q8_0", T.Q8_0, 1e-2)])
def test_f16_and_q8_0_rewrite_only_the_target(gqa_untied, tmp_path, fallback, new_type, tol):
    base, adapter, factors = gqa_untied
    out = tmp_path / "o.gguf"
    export_gguf(base, adapter, out, fallback=fallback, metadata=False, log=lambda s: None)
    errors = compare(base, out, factors, same_layout=False)
    a, b = GGUFReader(base), GGUFReader(out)
    types = {t.name: t.tensor_type for t in b.tensors}
    for name, (axis, _) in factors.items():
        assert types[name] == (new_type if axis == "columns" else T.Q4_K), name
        assert errors[name] <= (tol if axis == "columns" else 4 * 2.0**-11), (name, errors[name])
    assert all(types[t.name] == t.tensor_type for t in a.tensors if t.name not in factors)
    # metadata bytes identical; the tensor table differs only in types and offsets
    kv_end = min(f.offset for f in (t.field for t in a.tensors))
    assert np.array_equal(a.data[:kv_end], b.data[:kv_end])
    for t, u in zip(a.tensors, b.tensors):
        assert (t.name, list(t.shape)) == (u.name, list(u.shape))


def test_requant_where_gguf_py_can(tmp_path):
    """Q4_0 target: dequantize, scale columns, quantize back; same size, error reported."""
    base = write_random_gguf(tmp_path / "base.gguf", tiny_for_gguf("llama", **SIZES), T.Q4_0)
    adapter = make_adapter(tmp_path / "adapter", tiny_for_gguf("llama", **SIZES), tie_kv=False)
    report = export_gguf(base, adapter, tmp_path / "o.gguf", fallback="requant", log=lambda s: None)
    g = stored_gains(adapter)
    factors = {f"blk.{i}.attn_output.weight": ("columns", g[f"model.layers.{i}.self_attn.o_proj"]) for i in range(2)}
    factors.update({f"blk.{i}.ffn_up.weight": ("rows", g[f"model.layers.{i}.mlp.down_proj"]) for i in range(2)})
    errors = compare(base, tmp_path / "o.gguf", factors, requantized=[k for k in factors if "attn_output" in k])
    assert max(errors[k] for k in factors if "ffn_up" in k) <= 4 * 2.0**-11
    a, b = GGUFReader(base), GGUFReader(tmp_path / "o.gguf")
    new = {t.name: t for t in b.tensors}
    for t in a.tensors:
        if "attn_output" in t.name:
            _, f = factors[t.name]
            want = gq.quantize(values(t) * f[None, :], T.Q4_0)  # independent requantization
            assert np.array_equal(np.asarray(new[t.name].data), want)
    by = {r["tensor"]: r for r in report}
    assert by["blk.0.attn_output.weight"]["how"] == "requant"
    assert 1e-3 < by["blk.0.attn_output.weight"]["rel_err"] < 0.2
    assert by["blk.0.ffn_up.weight"]["how"] == "scales"


def test_mha_untied_attention_gains_fold_into_v_rows(tmp_path):
    sizes = dict(SIZES, num_key_value_heads=4)
    base = write_random_gguf(tmp_path / "base.gguf", tiny_for_gguf("llama", **sizes), T.Q4_K)
    adapter = make_adapter(tmp_path / "adapter", tiny_for_gguf("llama", **sizes), tie_kv=False)
    report = export_gguf(base, adapter, tmp_path / "o.gguf", fallback="refuse", log=lambda s: None)
    assert {r["how"] for r in report} == {"scales"}
    g = stored_gains(adapter)
    factors = {f"blk.{i}.attn_v.weight": ("rows", g[f"model.layers.{i}.self_attn.o_proj"]) for i in range(2)}
    factors.update({f"blk.{i}.ffn_up.weight": ("rows", g[f"model.layers.{i}.mlp.down_proj"]) for i in range(2)})
    assert max(compare(base, tmp_path / "o.gguf", factors).values()) <= 4 * 2.0**-11


def test_producer_bias_is_scaled_with_its_rows(tmp_path):
    """qwen2's V projection has a bias: folding into V rows scales it too (F32, exact)."""
    base = write_gguf(tmp_path / "base.gguf", tiny_for_gguf("qwen2", **SIZES), T.Q4_0)
    adapter = make_adapter(tmp_path / "adapter", tiny_for_gguf("qwen2", **SIZES))
    report = export_gguf(base, adapter, tmp_path / "o.gguf", fallback="refuse", log=lambda s: None)
    factors = row_factors(adapter)
    for i in range(2):
        factors[f"blk.{i}.attn_v.bias"] = ("elements", factors[f"blk.{i}.attn_v.weight"][1])
    assert {r["tensor"] for r in report} == set(factors)
    errors = compare(base, tmp_path / "o.gguf", factors)
    assert max(errors.values()) <= 4 * 2.0**-11
    assert max(errors[f"blk.{i}.attn_v.bias"] for i in range(2)) <= 2.0**-23


def test_moe_expert_gains_fold_into_each_experts_up_rows(tmp_path):
    """mlx-lm's switch_mlp (E experts stacked) -> gguf-py's *_exps tensors (E, rows, cols):
    expert e's FFN-down gains land on the rows of expert e's up projection."""
    import gguf

    hidden, ffn, experts, heads, kv = 64, 32, 4, 4, 2
    hd = hidden // heads
    rng = np.random.default_rng(0)
    base = tmp_path / "moe.gguf"
    w = gguf.GGUFWriter(str(base), "qwen3moe")
    w.add_block_count(1)
    w.add_embedding_length(hidden)
    w.add_head_count(heads)
    w.add_head_count_kv(kv)
    shapes = {"attn_output": (hidden, heads * hd), "attn_v": (kv * hd, hidden),
              "ffn_up_exps": (experts, ffn, hidden), "ffn_down_exps": (experts, hidden, ffn)}
    for name, shape in shapes.items():
        w.add_tensor(f"blk.0.{name}.weight", gq.quantize(rng.standard_normal(shape).astype(np.float32), T.Q4_0),
                     raw_dtype=T.Q4_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    attn, down = "model.layers.0.self_attn.o_proj", "model.layers.0.mlp.switch_mlp.down_proj"
    gains = {attn: rng.uniform(0.6, 1.4, (kv, hd)), down: rng.uniform(0.6, 1.4, (experts, ffn))}
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    mx.save_safetensors(str(adapter / "gains.safetensors"),
                        {k + ".gain": mx.array(v.astype(np.float32)) for k, v in gains.items()})
    targets = [
        dict(path=attn, kind="attn", layer=0, producer="model.layers.0.self_attn.v_proj", producer_rows="all", tied=True),
        dict(path=down, kind="ffn", layer=0, producer="model.layers.0.mlp.switch_mlp.up_proj", producer_rows="all", tied=False),
    ]
    (adapter / "gain_config.json").write_text(json.dumps(dict(
        format_version=1, variant="gain-ffn", tie_kv=True, model_type="qwen3_moe", num_layers=1,
        hidden_size=hidden, targets=targets, fingerprint=None)))
    report = export_gguf(base, adapter, tmp_path / "o.gguf", fallback="refuse", log=lambda s: None)
    assert {r["tensor"] for r in report} == {"blk.0.attn_v.weight", "blk.0.ffn_up_exps.weight"}
    a, b = GGUFReader(base), GGUFReader(tmp_path / "o.gguf")
    old, new = {t.name: t for t in a.tensors}, {t.name: t for t in b.tensors}
    up = "blk.0.ffn_up_exps.weight"
    want = values(old[up]) * gains[down][:, :, None]  # (E, rows, cols) * (E, rows, 1)
    assert np.linalg.norm(values(new[up]) - want) / np.linalg.norm(want) <= 4 * 2.0**-11
    v = "blk.0.attn_v.weight"
    want = values(old[v]) * gains[attn].reshape(-1)[:, None]
    assert np.linalg.norm(values(new[v]) - want) / np.linalg.norm(want) <= 4 * 2.0**-11
    for name in ("blk.0.attn_output.weight", "blk.0.ffn_down_exps.weight"):
        assert np.array_equal(np.asarray(old[name].data), np.asarray(new[name].data))


def test_float_target_takes_columns_exactly(tmp_path):
    model = tiny_for_gguf("llama", **SIZES)
    base = write_gguf(tmp_path / "base.gguf", model, T.F16)
    adapter = make_adapter(tmp_path / "adapter", tiny_for_gguf("llama", **SIZES), tie_kv=False)
    report = export_gguf(base, adapter, tmp_path / "o.gguf", fallback="refuse", log=lambda s: None)
    g = stored_gains(adapter)
    factors = {f"blk.{i}.attn_output.weight": ("columns", g[f"model.layers.{i}.self_attn.o_proj"]) for i in range(2)}
    factors.update({f"blk.{i}.ffn_down.weight": ("columns", g[f"model.layers.{i}.mlp.down_proj"]) for i in range(2)})
    assert {(r["axis"], r["how"]) for r in report} == {("columns", "scales")}
    assert max(compare(base, tmp_path / "o.gguf", factors).values()) <= 2.0**-10


# --- metadata -------------------------------------------------------------------------

def test_hub_id_adapter_and_one_gains_hash(tmp_path, offline_hub):
    """--adapter-path takes a Hub repo id (from the Hub cache, offline) as generate and serve
    do; the GGUF records the gains file's SHA-256, the value fuse records in fold_plan.json."""
    import hashlib

    base = write_random_gguf(tmp_path / "base.gguf", tiny_for_gguf("llama", **SIZES), T.Q4_1)
    adapter = make_adapter(tmp_path / "adapter", tiny_for_gguf("llama", **SIZES))
    offline_hub(adapter, "someone/legal-gain")
    export_gguf(base, adapter, tmp_path / "local.gguf", log=lambda s: None)
    export_gguf(base, "someone/legal-gain", tmp_path / "hub.gguf", log=lambda s: None)
    local, hub = GGUFReader(tmp_path / "local.gguf"), GGUFReader(tmp_path / "hub.gguf")
    assert hub.get_field("gain_mlx.adapter").contents() == "someone/legal-gain"
    for t in local.tensors:
        assert np.array_equal(np.asarray(t.data), np.asarray(hub.get_tensor(local.tensors.index(t)).data)), t.name
    want = hashlib.sha256((adapter / "gains.safetensors").read_bytes()).hexdigest()
    assert local.get_field("gain_mlx.gains_sha256").contents() == want == hub.get_field("gain_mlx.gains_sha256").contents()


def test_metadata_adds_provenance_and_keeps_tensors(tmp_path):
    """Provenance and fold history are written by default; --no-metadata keeps the
    header byte-identical."""
    base = write_random_gguf(tmp_path / "base.gguf", tiny_for_gguf("llama", **SIZES), T.Q4_1)
    adapter = make_adapter(tmp_path / "adapter", tiny_for_gguf("llama", **SIZES))
    export_gguf(base, adapter, tmp_path / "plain.gguf", metadata=False, log=lambda s: None)
    export_gguf(base, adapter, tmp_path / "meta.gguf", log=lambda s: None)
    plain, meta, orig = GGUFReader(tmp_path / "plain.gguf"), GGUFReader(tmp_path / "meta.gguf"), GGUFReader(base)
    config = json.loads((adapter / "gain_config.json").read_text())
    assert meta.get_field("gain_mlx.variant").contents() == "gain-ffn"
    assert meta.get_field("gain_mlx.tie_kv").contents() is True
    assert meta.get_field("gain_mlx.targets").contents() == [t["path"] for t in config["targets"]]
    assert len(meta.get_field("gain_mlx.gains_sha256").contents()) == 64
    assert meta.get_field("gain_mlx.adapter").contents() == "adapter"
    assert meta.get_field("gain_mlx.history_version").contents() == 1
    assert meta.get_field("gain_mlx.folds").contents() == 1
    edits = meta.get_field("gain_mlx.edits").contents()
    assert sorted(e.split()[0] for e in edits) == sorted(f"blk.{i}.{n}.weight" for i in range(2) for n in ("attn_v", "ffn_up"))
    assert len(meta.get_field("gain_mlx.factors").contents()) == 2 * (2 * 64 + 512)  # V rows (2 KV heads x 64) + up rows
    assert not any(k.startswith("gain_mlx.") for k in plain.fields)
    assert (tmp_path / "plain.gguf").read_bytes()[:orig.data_offset] == base.read_bytes()[:orig.data_offset]
    same_header(orig, meta)
    for t, u in zip(plain.tensors, meta.tensors):
        assert np.array_equal(np.asarray(t.data), np.asarray(u.data)), t.name
    # exporting onto an exported file switches it: keys replaced, not duplicated
    # (GGUFReader rejects duplicates), the fold counted
    export_gguf(tmp_path / "meta.gguf", adapter, tmp_path / "twice.gguf", log=lambda s: None)
    twice = GGUFReader(tmp_path / "twice.gguf")
    assert twice.get_field("gain_mlx.variant").contents() == "gain-ffn"
    assert twice.get_field("gain_mlx.folds").contents() == 2


# --- bad input ------------------------------------------------------------------------

def run_cli(*args):
    with pytest.raises(SystemExit) as e:
        export_main([str(a) for a in args])
    msg = str(e.value)
    assert msg.startswith("error: ") and "\n" not in msg, msg
    return msg


@pytest.fixture
def q4(tmp_path):
    base = write_random_gguf(tmp_path / "base.gguf", tiny_for_gguf("llama", **SIZES), T.Q4_0)
    adapter = make_adapter(tmp_path / "adapter", tiny_for_gguf("llama", **SIZES))
    return base, adapter


def test_missing_inputs(q4, tmp_path):
    base, adapter = q4
    out = tmp_path / "o.gguf"
    assert "not found" in run_cli("--gguf", tmp_path / "nope.gguf", "--adapter-path", adapter, "--out", out)
    assert "not found" in run_cli("--gguf", base, "--adapter-path", tmp_path / "nope", "--out", out)
    assert "does not exist" in run_cli("--gguf", base, "--adapter-path", adapter, "--out", tmp_path / "x" / "o.gguf")
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf at all" * 10)
    assert "not a readable GGUF" in run_cli("--gguf", tmp_path / "junk.gguf", "--adapter-path", adapter, "--out", out)
    assert not out.exists() and not leftovers(tmp_path)


def test_output_is_never_overwritten_without_force_and_never_the_input(q4, tmp_path):
    base, adapter = q4
    out = tmp_path / "o.gguf"
    out.write_bytes(b"keep me")
    assert "--force" in run_cli("--gguf", base, "--adapter-path", adapter, "--out", out)
    assert out.read_bytes() == b"keep me"
    before = base.read_bytes()
    assert "is the input" in run_cli("--gguf", base, "--adapter-path", adapter, "--out", base, "--force")
    assert base.read_bytes() == before
    export_main(["--gguf", str(base), "--adapter-path", str(adapter), "--out", str(out), "--force"])
    same_header(GGUFReader(base), GGUFReader(out))
    assert not leftovers(tmp_path)


@pytest.mark.parametrize("key,value,words", [
    ("model_type", "qwen2", "'qwen2' model"),
    ("num_layers", 3, "num_layers=3"),
    ("hidden_size", 128, "hidden_size=128"),
])
def test_adapter_for_another_base_is_refused(q4, tmp_path, key, value, words):
    base, adapter = q4
    cfg = adapter / "gain_config.json"
    cfg.write_text(json.dumps({**json.loads(cfg.read_text()), key: value}))
    msg = run_cli("--gguf", base, "--adapter-path", adapter, "--out", tmp_path / "o.gguf")
    assert words in msg
    assert not (tmp_path / "o.gguf").exists() and not leftovers(tmp_path)


def test_fingerprint_tells_the_right_base_from_another(tmp_path):
    """An adapter trained on model A fits A's GGUF and not B's (same shapes)."""
    a = tiny_for_gguf("llama", seed=0, **SIZES)
    base_a = write_gguf(tmp_path / "a.gguf", a, T.Q8_0)
    base_b = write_gguf(tmp_path / "b.gguf", tiny_for_gguf("llama", seed=1, **SIZES), T.Q8_0)
    adapter = make_adapter(tmp_path / "adapter", a, fingerprint=True)
    export_gguf(base_a, adapter, tmp_path / "ok.gguf", log=lambda s: None)
    msg = run_cli("--gguf", base_b, "--adapter-path", adapter, "--out", tmp_path / "o.gguf")
    assert "different base weights" in msg and not (tmp_path / "o.gguf").exists()


# --- the real model, through llama.cpp ------------------------------------------------

_MLX_LOGITS = textwrap.dedent(
    """
    import sys
    import mlx.core as mx, numpy as np
    from gain_mlx.adapter import load_adapter
    from gain_mlx.loading import load_model
    model, _, _ = load_model(sys.argv[1], verbose=False)
    load_adapter(model, sys.argv[2])
    ids = np.load(sys.argv[3])
    np.save(sys.argv[4], np.array(model(mx.array(ids)[None])[0].astype(mx.float32)))
    """
)


def _fast_env():
    from gain_mlx.cpu import find_fast_blas

    env = dict(os.environ)
    found = find_fast_blas()
    if found:
        env["LD_PRELOAD"] = " ".join(filter(None, [found[1], env.get("LD_PRELOAD")]))
    return env


def real_text() -> str:
    from pydoc_data.topics import topics

    return "\n\n".join([topics["assert"], topics["while"], topics["for"]])


@pytest.mark.real
@pytest.mark.llamacpp
def test_smollm2_patched_gguf_matches_mlx_in_llama_cpp(tmp_path):
    """Train gain-ffn (KV-tied) briefly on real text, export into SmolLM2's own Q4_1 GGUF,
    and compare llama.cpp's logits with the MLX model (imported from the same GGUF, gains
    applied): the patched file must agree, the unpatched one clearly not."""
    pytest.importorskip("llama_cpp", reason="needs llama-cpp-python (pip install 'gain-mlx[llamacpp]')")
    from gguf_fixtures import llamacpp_logits
    from llama_cpp import Llama

    from gain_mlx.loading import default_model_path

    try:
        gguf_path = default_model_path()
    except FileNotFoundError as e:
        pytest.skip(f"SmolLM2 not installed: {e}")
    adapter = tmp_path / "adapter"
    data = Path(__file__).resolve().parent.parent / "examples" / "data"
    subprocess.run(
        [sys.executable, "-m", "gain_mlx.train", "--model", str(gguf_path), "--data", str(data),
         "--variant", "gain-ffn", "--tie-kv", "--iters", "3", "--batch-size", "1",
         "--max-seq-length", "64", "--learning-rate", "5e-2", "--val-batches", "1",
         "--steps-per-eval", "1000", "--adapter-path", str(adapter)],
        env=_fast_env(), check=True, capture_output=True,
    )
    out = tmp_path / "patched.gguf"
    report = export_gguf(gguf_path, adapter, out, fallback="refuse", metadata=False, log=lambda s: None)
    assert {r["how"] for r in report} == {"scales"} and max(r["rel_err"] for r in report) < 1e-3
    assert out.stat().st_size == gguf_path.stat().st_size  # without the fold history: same size

    vocab = Llama(model_path=str(gguf_path), vocab_only=True, verbose=False)
    ids = vocab.tokenize(real_text().encode(), add_bos=False, special=False)[:128]
    np.save(tmp_path / "ids.npy", np.asarray(ids, dtype=np.int32))
    subprocess.run(
        [sys.executable, "-c", _MLX_LOGITS, str(gguf_path), str(adapter), str(tmp_path / "ids.npy"),
         str(tmp_path / "mlx.npy")], env=_fast_env(), check=True,
    )
    reference = np.load(tmp_path / "mlx.npy")
    kl, top1 = kl_top1(reference, llamacpp_logits(out, ids))
    kl_base, top1_base = kl_top1(reference, llamacpp_logits(gguf_path, ids))
    print(f"SmolLM2 Q4_1 + gains, {len(ids)} positions: patched KL {kl:.4f} top-1 {top1:.3f}; "
          f"unpatched KL {kl_base:.4f} top-1 {top1_base:.3f}")
    assert kl <= 0.02 and top1 >= 0.85, (kl, top1)
    assert kl_base >= 5 * kl, (kl_base, kl)


def test_gguf_export_does_not_import_mlx_lm(q4, tmp_path):
    """The GGUF exporter needs tensor names, not models: mlx-lm pulls in transformers,
    seconds of start-up that made a 1 GiB export several times slower than `cp`."""
    base, adapter = q4
    code = ("import sys; from gain_mlx.export import main; "
            f"main(['--gguf', {str(base)!r}, '--adapter-path', {str(adapter)!r}, '--out', {str(tmp_path / 'o.gguf')!r}]); "
            "print(sorted(m for m in ('mlx_lm', 'transformers') if m in sys.modules))")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip().splitlines()[-1] == "[]"
