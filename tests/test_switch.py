"""Domain switching: export onto a GGUF exported earlier divides its gains out first."""
import numpy as np
import pytest
from gguf import GGMLQuantizationType as T
from gguf import GGUFReader

from gain_mlx.gguf import quants as Q
from gain_mlx.gguf.export import ExportError, export_gguf
from gguf_fixtures import field_mask, tiny_for_gguf, write_random_gguf
from test_export import SIZES, make_adapter

quiet = dict(log=lambda s: None)


def fields(path):
    """{tensor: (raw bytes, scale field values)} of every tensor."""
    out = {}
    for t in GGUFReader(path).tensors:
        raw = np.asarray(t.data).view(np.uint8)
        out[t.name] = (t.tensor_type, raw)
    return out


def scale_values(qtype, raw):
    layout = Q.SCALES[qtype]
    blocks = Q.blocks_of(raw.reshape(raw.shape[0], -1) if raw.ndim > 1 else raw[None], qtype)
    return [Q.CODECS[layout.kind][0](blocks, o) for o in layout.offsets]


@pytest.mark.parametrize("qtype", [T.Q4_K, T.Q6_K, T.IQ4_XS, T.Q4_1], ids=lambda t: t.name)
def test_a_b_a_reproduces_a(tmp_path, qtype):
    base = write_random_gguf(tmp_path / "base.gguf", tiny_for_gguf("llama", **SIZES), qtype)
    a = make_adapter(tmp_path / "A", tiny_for_gguf("llama", **SIZES), seed=1)
    b = make_adapter(tmp_path / "B", tiny_for_gguf("llama", **SIZES), seed=2)
    export_gguf(base, a, tmp_path / "a.gguf", **quiet)
    export_gguf(tmp_path / "a.gguf", b, tmp_path / "b.gguf", **quiet)
    export_gguf(base, b, tmp_path / "b_fresh.gguf", **quiet)
    export_gguf(tmp_path / "b.gguf", a, tmp_path / "a2.gguf", **quiet)
    for want_path, got_path in (("a.gguf", "a2.gguf"), ("b_fresh.gguf", "b.gguf")):
        want, got = fields(tmp_path / want_path), fields(tmp_path / got_path)
        equal = total = 0
        for name, (qt, raw) in want.items():
            qt2, raw2 = got[name]
            assert qt == qt2
            if np.array_equal(raw, raw2):
                continue
            mask = np.tile(field_mask(qt), raw.shape[-1] // len(field_mask(qt)))
            assert np.array_equal(raw[..., ~mask], raw2[..., ~mask]), name  # only scale fields differ
            for x, y in zip(scale_values(qt, raw), scale_values(qt, raw2)):
                ulp = np.spacing(np.abs(x).astype(np.float16)).astype(np.float64)
                assert np.all(np.abs(x - y) <= 2 * ulp), name  # storage rounding
                equal += int((x == y).sum())
                total += x.size
        print(f"{qtype.name} {got_path} vs {want_path}: {equal}/{total} differing-tensor fields bit-equal")
    assert GGUFReader(tmp_path / "a2.gguf").get_field("gain_mlx.folds").contents() == 3


def test_old_metadata_without_history_is_refused(tmp_path):
    import gguf

    base = write_random_gguf(tmp_path / "base.gguf", tiny_for_gguf("llama", **SIZES), T.Q4_K)
    r = GGUFReader(base)
    w = gguf.GGUFWriter(str(tmp_path / "old.gguf"), "llama")
    # copy with an extra gain_mlx key and no history, as --metadata of an older gain_mlx
    for f in r.fields.values():
        if f.name.startswith("GGUF.") or f.name == "general.architecture":
            continue
        vt = f.types[0]
        if vt == gguf.GGUFValueType.ARRAY:
            w.add_key_value(f.name, f.contents(), vt, sub_type=f.types[-1])
        else:
            w.add_key_value(f.name, f.contents(), vt)
    w.add_string("gain_mlx.variant", "gain-ffn")
    for t in r.tensors:
        w.add_tensor(t.name, np.asarray(t.data), raw_shape=np.asarray(t.data).shape, raw_dtype=t.tensor_type)
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
    a = make_adapter(tmp_path / "A", tiny_for_gguf("llama", **SIZES))
    with pytest.raises(ExportError, match="no fold history"):
        export_gguf(tmp_path / "old.gguf", a, tmp_path / "o.gguf", **quiet)


def test_non_invertible_fallback_is_refused_f16_switches(tmp_path):
    base = write_random_gguf(tmp_path / "base.gguf", tiny_for_gguf("llama", **SIZES), T.Q4_K)
    untied = make_adapter(tmp_path / "U", tiny_for_gguf("llama", **SIZES), tie_kv=False)
    other = make_adapter(tmp_path / "B", tiny_for_gguf("llama", **SIZES), tie_kv=False, seed=3)
    report = export_gguf(base, untied, tmp_path / "q8.gguf", **quiet)  # default auto -> Q8_0
    assert {r["how"] for r in report if "attn_output" in r["tensor"]} == {"q8_0"}
    with pytest.raises(ExportError, match="cannot be divided back out"):
        export_gguf(tmp_path / "q8.gguf", other, tmp_path / "o.gguf", **quiet)
    assert not (tmp_path / "o.gguf").exists()
    export_gguf(base, untied, tmp_path / "f16.gguf", fallback="f16", **quiet)
    export_gguf(tmp_path / "f16.gguf", other, tmp_path / "sw.gguf", fallback="f16", **quiet)
    export_gguf(base, other, tmp_path / "fresh.gguf", fallback="f16", **quiet)
    x, y = GGUFReader(tmp_path / "sw.gguf"), GGUFReader(tmp_path / "fresh.gguf")
    for t, u in zip(x.tensors, y.tensors):
        a, b = Q.dequantize(np.asarray(t.data), t.tensor_type), Q.dequantize(np.asarray(u.data), u.tensor_type)
        assert np.linalg.norm(a - b) <= 2.0**-10 * np.linalg.norm(b), t.name


def test_switch_drift(tmp_path):
    """Error of the scales after n switches vs a fresh export from the base (printed)."""
    base = write_random_gguf(tmp_path / "base.gguf", tiny_for_gguf("llama", **SIZES), T.Q4_K)
    adapters = [make_adapter(tmp_path / f"d{i}", tiny_for_gguf("llama", **SIZES), seed=10 + i) for i in range(4)]
    rng = np.random.default_rng(0)
    cur = tmp_path / "cur0.gguf"
    export_gguf(base, adapters[0], cur, **quiet)
    last = 0
    for n in range(1, 11):
        last = int(rng.integers(4))
        nxt = tmp_path / f"cur{n}.gguf"
        export_gguf(cur, adapters[last], nxt, **quiet)
        cur.unlink()
        cur = nxt
    export_gguf(base, adapters[last], tmp_path / "fresh.gguf", **quiet)
    x, y = GGUFReader(cur), GGUFReader(tmp_path / "fresh.gguf")
    worst = 0.0
    for t, u in zip(x.tensors, y.tensors):
        a, b = Q.dequantize(np.asarray(t.data), t.tensor_type), Q.dequantize(np.asarray(u.data), u.tensor_type)
        worst = max(worst, float(np.linalg.norm(a - b) / (np.linalg.norm(b) + 1e-30)))
    print(f"Q4_K after 10 switches: largest tensor relative error vs fresh export {worst:.1e}")
    assert worst <= 2e-3
