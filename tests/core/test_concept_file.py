"""Concept files: exact fp16 round trip, size at SD1.5 dimensions, atomic saves, and a clear error per bad input."""
import json
import os
import subprocess
import sys
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file, save_file

from tools.factories import REPO, SDXL_LAYERS, SDXL_TEXT_WIDTH, random_concept
from perfusion_ops import ConceptError, export_embedding, load_concept, save_concept
from perfusion_ops.concept import TrainingState
from perfusion_ops.concept_file import concept_to_bytes, load_training_state
from perfusion_ops.envelope import FORMAT_VERSION, MAX_FILE_BYTES, MAX_HEADER_BYTES, MAX_STEPS, MAX_TENSORS
from perfusion_ops.files import safe_file_name


@pytest.fixture
def concept():
    return random_concept(seed=3)


def fp16(t):
    return t.half().float()


@pytest.mark.parametrize("trained_k", [False, True])
def test_round_trip_is_exact_to_fp16_and_small(tmp_path, trained_k):
    concept = replace(random_concept(seed=1, trained_k=trained_k), gate_window=77 if trained_k else 0)
    path = save_concept(concept, tmp_path / "hugsy.safetensors")
    assert path.stat().st_size < 64 * 1024
    back = load_concept(path)
    for name in ("embedding", "target_input", "target_key", "superclass_encoding"):
        assert torch.equal(getattr(back, name), fp16(getattr(concept, name)))
    assert back.layers == concept.layers and len(back.layers) == 16
    for layer in concept.layers:
        assert torch.equal(back.value_outputs[layer], fp16(concept.value_outputs[layer]))
        if trained_k:
            assert torch.equal(back.key_outputs[layer], fp16(concept.key_outputs[layer]))
    assert back.trained_keys == trained_k
    for field in ("trigger", "superclass", "train_beta", "train_tau", "beta_local", "tau_local", "beta_global",
                  "tau_global", "text_encoder", "encoder_fingerprint", "model_family", "clip_layer", "gate_window",
                  "info"):
        assert getattr(back, field) == getattr(concept, field)


def corrupt(tmp_path, concept, edit):
    """Save ``concept``, then rewrite its tensors/metadata with ``edit(tensors, metadata)``."""
    path = save_concept(concept, tmp_path / "c.safetensors")
    from safetensors import safe_open

    with safe_open(path, "pt") as f:
        metadata = f.metadata()
    tensors = load_file(path)
    edit(tensors, metadata)
    save_file(tensors, path, metadata=metadata)
    return path


@pytest.mark.parametrize(
    "edit,message",
    [
        (lambda t, m: t.update(i=torch.zeros(767, dtype=torch.float16)), r"'target_input' has shape \(767,\)"),
        (lambda t, m: t.pop("q"), "missing fields: q"),
        (lambda t, m: m.pop("trigger"), "missing fields: trigger"),
        (lambda t, m: t["o_v.middle_block.1.transformer_blocks.0.attn2"].__setitem__(5, float("nan")), "NaN"),
        (lambda t, m: m.update(format_version=str(FORMAT_VERSION + 1)), "newer comfyui-perfusion"),
        (lambda t, m: m.update(format="lora"), "not a Perfusion concept"),
        (lambda t, m: m.update(tau_local="0"), "τ = 0.0"),
        (lambda t, m: m.update(beta_local="nan"), "β = nan"),
        (lambda t, m: (t.update({"o_v.bad name": torch.zeros(3, dtype=torch.float16)}),
                       m.update(layers=json.dumps(json.loads(m["layers"]) + ["bad name"]))), "bad layer name"),
        (lambda t, m: t.pop("o_v.input_blocks.1.1.transformer_blocks.0.attn2"), "inconsistent layer list"),
    ],
)
def test_bad_fields_give_clear_errors(tmp_path, concept, edit, message):
    path = corrupt(tmp_path, concept, edit)
    with pytest.raises(ConceptError, match=message):
        load_concept(path)


def _many_layers(t, m, count):
    layers = [f"output_blocks.{n}.1.transformer_blocks.0.attn2" for n in range(count)]
    t.update({f"o_v.{layer}": torch.zeros(4, dtype=torch.float16) for layer in layers})
    for key in [k for k in t if k.startswith("o_v.") and k[4:] not in layers]:
        del t[key]
    m.update(layers=json.dumps(layers))


@pytest.mark.parametrize(
    "edit,message",
    [
        (lambda t, m: t.update(i=t["i"].to(torch.int8)), r"tensor 'i' is I8: .*float16, bfloat16 or float32"),
        (lambda t, m: t.update(e_sup=t["e_sup"] > 0), "tensor 'e_sup' is BOOL"),
        (lambda t, m: t.update(q=t["q"].double()), "tensor 'q' is F64"),
        (lambda t, m: t.update(embedding=t["embedding"].to(torch.uint8)), "tensor 'embedding' is U8"),
        (lambda t, m: m.update(format_version="0"), f"format version 0: .*versions 1 to {FORMAT_VERSION}"),
        (lambda t, m: m.update(format_version="-3"), "format version -3"),
        (lambda t, m: m.update(format_version="1.5"), "unreadable format version"),
        (lambda t, m: m.update(gate_window="-1"), "gate window -1 must be 0"),
        (lambda t, m: m.update(gate_window="5000"), "gate window 5000 must be 0 .* or 1 to 4096"),
        (lambda t, m: m.update(gate_window="77.5"), "unreadable setting"),
        (lambda t, m: t.update(embedding=torch.zeros(10_000, 768, dtype=torch.float16)), "10000 embedding vectors"),
        (lambda t, m: t.update(embedding=torch.zeros(0, 768, dtype=torch.float16)), "0 embedding vectors"),
        (lambda t, m: t.update(embedding=torch.zeros(768, dtype=torch.float16)), "embedding must have shape"),
        (lambda t, m: t.update(extra=torch.zeros(3, dtype=torch.float16)), "tensor 'extra' is not part of"),
        (lambda t, m: t.update({"o_k.nowhere": torch.zeros(3, dtype=torch.float16)}), "not part of|different layers"),
        (lambda t, m: t.update({"o_v.input_blocks.1.1.transformer_blocks.0.attn2":
                                torch.zeros(0, dtype=torch.float16)}),
         r"'o_v.input_blocks.1.1.transformer_blocks.0.attn2' has shape \(0,\)"),
        (lambda t, m: t.update({"o_v.input_blocks.1.1.transformer_blocks.0.attn2":
                                torch.zeros(9000, dtype=torch.float16)}),
         r"has shape \(9000,\)"),
        (lambda t, m: _many_layers(t, m, 129), "129 layers: a concept edits 1 to 128"),
        (lambda t, m: t.update({f"o_k.{k[4:]}": torch.zeros(3, dtype=torch.float16)
                                for k in list(t) if k[:4] == "o_v."}),
         r"'o_k\.[\w.]+' has shape \(3,\) but 'o_v"),
    ],
)
def test_files_outside_the_concept_envelope_are_refused(tmp_path, concept, edit, message):
    path = corrupt(tmp_path, concept, edit)
    with pytest.raises(ConceptError, match=message):
        load_concept(path)


def test_header_and_tensor_count_are_bounded_before_parsing(tmp_path, monkeypatch):
    """A header larger than any concept's, or more tensors than a concept holds, is refused before the header is
    parsed (first case) or before any tensor is (second): no parser ever sees them."""
    import perfusion_ops.concept_file as concept_file

    entries = lambda count: {f"t{n}": {"dtype": "F16", "shape": [1], "data_offsets": [2 * n, 2 * n + 2]}
                             for n in range(count)}
    huge = json.dumps(entries(150_000)).encode()  # the 10.8 MB file that held the server for seconds
    many = json.dumps(entries(MAX_TENSORS + 1)).encode()
    (tmp_path / "huge.safetensors").write_bytes(safetensors_bytes(huge, bytes(300_000)))
    (tmp_path / "many.safetensors").write_bytes(safetensors_bytes(many, bytes(2 * MAX_TENSORS + 2)))
    parsed, parse_header = [], json.loads
    monkeypatch.setattr(concept_file, "st_load", lambda data: parsed.append("tensors"))
    monkeypatch.setattr(json, "loads", lambda *a, **k: parsed.append("header") or parse_header(*a, **k))
    with pytest.raises(ConceptError, match=r"'huge.safetensors' has a \d+ KB header: a Perfusion concept's is at "
                                           r"most 128 KB"):
        load_concept(tmp_path / "huge.safetensors")
    assert parsed == []
    with pytest.raises(ConceptError, match=f"'many.safetensors' holds {MAX_TENSORS + 1} tensors: a Perfusion concept "
                                           f"holds at most {MAX_TENSORS}"):
        load_concept(tmp_path / "many.safetensors")
    assert parsed == ["header"]


def test_the_largest_concept_of_the_envelope_loads(tmp_path):
    from perfusion_ops.envelope import MAX_LAYERS, MAX_VECTORS

    layers = {f"output_blocks.{n}.1.transformer_blocks.{n % 10}.attn2": 1280 for n in range(MAX_LAYERS)}
    concept = random_concept(seed=2, layers=layers, trained_k=True)
    concept.embedding = torch.randn(MAX_VECTORS, 768)
    concept.info = {"steps": "400", "images": "20", "resolution": "1024", "note": "x" * 200}
    back = load_concept(save_concept(concept, tmp_path / "largest.safetensors", dtype=torch.float32))
    assert back.layers == concept.layers and back.embedding.shape == (MAX_VECTORS, 768)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def random_state(concept, step=12, seed=0, history=None):
    """A valid training state for ``concept``: ``history`` losses (default: all ``step``), random Adam moments."""
    g = torch.Generator().manual_seed(seed)
    moments = {name: torch.stack([torch.randn(t.shape, generator=g), torch.rand(t.shape, generator=g) * 1e-9])
               for name, t in concept.learned.items()}
    return TrainingState(step, torch.rand(history or step, generator=g), moments)


def metadata_of(path):
    from safetensors import safe_open

    with safe_open(path, "pt") as f:
        return f.metadata()


@pytest.mark.parametrize("trained_k", [False, True])
def test_training_state_round_trip_is_exact_and_leaves_the_concept_readable(tmp_path, trained_k):
    concept = random_concept(seed=4, trained_k=trained_k)
    state = random_state(concept, history=9)
    path = save_concept(concept, tmp_path / "hugsy-checkpoint.safetensors", dtype=torch.float32, state=state)
    back, back_state = load_training_state(path)
    assert back_state.step == 12 and torch.equal(back_state.losses, state.losses)
    assert back_state.moments.keys() == concept.learned.keys() == back.learned.keys()
    assert all(torch.equal(back_state.moments[n], state.moments[n]) for n in state.moments)  # 1e-9: float32 kept
    assert all(torch.equal(back.learned[n], t) for n, t in concept.learned.items())
    assert torch.equal(load_concept(path).embedding, concept.embedding)  # Load Concept reads a checkpoint as a concept
    assert metadata_of(path)["format_version"] == "2"
    plain = save_concept(concept, tmp_path / "hugsy.safetensors")
    assert metadata_of(plain)["format_version"] == "1"  # no state: still readable by packs that read version 1
    assert load_training_state(plain)[1] is None


@pytest.fixture(scope="module")
def checkpoint_data():
    """A checkpoint's bytes (concept and training state, float32), built once for the cases below."""
    concept = random_concept(seed=3)
    return concept_to_bytes(concept, torch.float32, random_state(concept))


def _drop_moment(t, m):
    del t[next(k for k in t if k.startswith("state.adam.o_v."))]


@pytest.mark.parametrize("edit,message", [
    (lambda t, m: m.update(format_version="1"), "a training state needs format version 2, the file says 1"),
    (lambda t, m: m.update({"state.step": "0"}), "0 steps taken; a state records 1 to"),
    (lambda t, m: m.update({"state.step": str(MAX_STEPS + 1)}), f"{MAX_STEPS + 1} steps taken"),
    (lambda t, m: m.update({"state.step": "ten"}), "unreadable step count"),
    (lambda t, m: m.pop("state.step"), "unreadable step count"),
    (lambda t, m: m.update({"state.step": "5"}), r"losses of 1 to 5 steps, got shape \(12,\)"),
    (lambda t, m: t.pop("state.losses"), r"losses of 1 to 12 steps, got shape \(0,\)"),
    (lambda t, m: t["state.losses"].__setitem__(3, float("inf")), "loss history contains NaN"),
    (_drop_moment, r"moments must cover exactly the 17 learned tensors; 'o_v\.[\w.]+' is missing"),
    (lambda t, m: t.update({"state.adam.o_k.x": torch.zeros(2, 3)}), "'o_k.x' is not one of them"),
    (lambda t, m: t.update({"state.adam.embedding": torch.zeros(2, 768)}),
     r"moments of 'embedding' must have shape \(2, 1, 768\)"),
    (lambda t, m: t["state.adam.embedding"].__setitem__((1, 0, 5), -1.0), "the second is negative"),
    (lambda t, m: t.update({"state.rng": torch.zeros(3)}), "'state.rng' is not part of a training state"),
])
def test_training_states_outside_the_envelope_are_refused(tmp_path, checkpoint_data, edit, message):
    path = tmp_path / "c.safetensors"
    path.write_bytes(checkpoint_data)
    metadata, tensors = metadata_of(path), load_file(path)
    edit(tensors, metadata)
    save_file(tensors, path, metadata=metadata)
    for load in (load_concept, load_training_state):
        with pytest.raises(ConceptError, match=message):
            load(path)


def test_the_largest_checkpoint_of_the_envelope_loads(tmp_path):
    from perfusion_ops.envelope import MAX_LAYERS, MAX_VECTORS, MAX_WIDTH

    layers = {f"output_blocks.{n}.1.transformer_blocks.{n % 10}.attn2": MAX_WIDTH for n in range(MAX_LAYERS)}
    concept = random_concept(seed=2, layers=layers, trained_k=True)
    concept.embedding = torch.randn(MAX_VECTORS, 768)
    path = save_concept(concept, tmp_path / "largest.safetensors", torch.float32, random_state(concept, MAX_STEPS))
    header = int.from_bytes(path.read_bytes()[:8], "little")
    assert len(load_file(path)) == MAX_TENSORS and header <= MAX_HEADER_BYTES and path.stat().st_size <= MAX_FILE_BYTES
    back, state = load_training_state(path)
    assert back.layers == concept.layers and state.step == MAX_STEPS and len(state.moments) == 1 + 2 * MAX_LAYERS


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_every_float_dtype_of_the_envelope_loads(tmp_path, concept, dtype):
    back = load_concept(save_concept(concept, tmp_path / "c.safetensors", dtype=dtype))
    assert back.embedding.dtype == torch.float32
    assert torch.equal(back.target_input, concept.target_input.to(dtype).float())
    with pytest.raises(ValueError, match="float16, bfloat16 or float32"):
        save_concept(concept, tmp_path / "d.safetensors", dtype=torch.int8)


def test_broken_files_give_clear_errors(tmp_path, concept):
    good = save_concept(concept, tmp_path / "good.safetensors").read_bytes()
    cases = {
        "truncated.safetensors": (good[: len(good) // 2], "truncated|corrupt"),
        "empty.safetensors": (b"", "empty or truncated"),
        "text.safetensors": (b"this is not a concept file at all\n" * 10, "truncated or not a safetensors"),
        "garbage.safetensors": (b"\x10\x00\x00\x00\x00\x00\x00\x00" + b"{nope}" + b" " * 20, "corrupt"),
    }
    for name, (data, message) in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(ConceptError, match=message):
            load_concept(tmp_path / name)
    torch.save({"i": concept.target_input}, tmp_path / "pickle.pt")
    with pytest.raises(ConceptError, match="pickle"):
        load_concept(tmp_path / "pickle.pt")
    with pytest.raises(ConceptError, match="does not exist"):
        load_concept(tmp_path / "missing.safetensors")


def safetensors_bytes(header: bytes, data: bytes = b"") -> bytes:
    """A safetensors file from a raw JSON header (whatever it holds) and a data section."""
    return len(header).to_bytes(8, "little") + header + data


@pytest.mark.parametrize("header", [  # each within the header bound, each far deeper than Python's recursion limit
    b'{"__metadata__": ' + b"[" * 30_000 + b"]" * 30_000 + b"}",
    b'{"i": {"dtype": "F16", "shape": ' + b"[" * 30_000 + b"]" * 30_000 + b', "data_offsets": [0, 2]}}',
    b"[" * 30_000 + b"]" * 30_000,
    b'{"__metadata__": ' + b'{"a":' * 10_000 + b"1" + b"}" * 10_000 + b"}",
])
def test_deeply_nested_headers_are_a_concept_error_naming_the_file(tmp_path, header):
    path = tmp_path / "nested.safetensors"
    path.write_bytes(safetensors_bytes(header, b"\0\0"))
    with pytest.raises(ConceptError, match="'nested.safetensors' is corrupt or not a safetensors file"):
        load_concept(path)


def test_concept_for_another_text_encoder_width_is_refused(tmp_path):
    wide = random_concept(width=1024, layers={"input_blocks.1.1.transformer_blocks.0.attn2": 320})
    path = save_concept(wide, tmp_path / "sd2.safetensors")
    assert load_concept(path).width == 1024
    with pytest.raises(ConceptError, match="SD2.x .* but this model's text encoder gives SD1.x"):
        load_concept(path, expected_width=768)


def test_concept_for_another_clip_layer_is_refused_with_the_hosts_remedy(concept):
    concept.check_clip_layer(concept.clip_layer, "unused")
    with pytest.raises(ConceptError, match=rf"layer {concept.clip_layer} .* but this CLIP uses layer -2 "
                                           r"\(clip skip 2\).*never open; raise it"):
        concept.check_clip_layer(-2, "raise it")


def test_save_is_atomic_and_never_destroys_the_earlier_file(tmp_path, concept, monkeypatch):
    path = save_concept(concept, tmp_path / "hugsy.safetensors")
    before = path.read_bytes()
    other = random_concept(seed=9)

    def crash(fd):
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", crash)
    with pytest.raises(OSError, match="disk full"):
        save_concept(other, path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hugsy.safetensors"]  # no temp file left behind
    monkeypatch.undo()
    broken = random_concept(seed=9)
    broken.value_outputs[broken.layers[0]][0] = float("inf")
    with pytest.raises(ConceptError, match="NaN or infinite"):
        save_concept(broken, path)
    assert path.read_bytes() == before


def test_embedding_export_is_a_standard_textual_inversion_file(tmp_path, concept):
    path = export_embedding(concept, tmp_path / "hugsy-embedding.safetensors")
    tensors = load_file(path)
    assert list(tensors) == ["emb_params"]
    assert tensors["emb_params"].shape == (1, 768) and tensors["emb_params"].dtype == torch.float32
    assert torch.equal(tensors["emb_params"], concept.embedding)


@pytest.mark.parametrize("name,message", [
    ("../evil", "plain file name"), ("a/b", "plain file name"), ("..\\x", "plain file name"),
    ("/abs", "plain file name"), ("", "empty"), ("  ", "empty"), ("bad\x00name", "letters, digits"),
    ("a:b", "letters, digits"), ("what?", "letters, digits"), ("-rf", "letters, digits"),
    ("con", "reserved device name"), ("CON", "reserved device name"), ("NUL", "reserved device name"),
    ("Com1", "reserved device name"), ("lpt9", "reserved device name"), ("aux.v2", "reserved device name"),
    ("prn.safetensors", "reserved device name"),
])
def test_save_names_are_refused_with_the_reason(name, message):
    with pytest.raises(ValueError, match=message):
        safe_file_name(name)


@pytest.mark.parametrize("name", ["名" * 100, "x" * 250, "ж" * 110, "é" * 120])
def test_names_the_file_system_cannot_hold_are_refused_before_anything_is_written(tmp_path, name):
    with pytest.raises(ValueError, match="too long for this file system.*bytes"):
        safe_file_name(name, folder=tmp_path, variants=("", "-checkpoint"))
    assert list(tmp_path.iterdir()) == []


def test_the_longest_accepted_name_saves_with_every_name_the_pack_derives(tmp_path, concept):
    """The check is exactly what the file system takes: the longest name it accepts saves (file, checkpoint and
    their temporary names), one character more is refused."""
    def accepted(n):
        try:
            safe_file_name("a" * n, folder=tmp_path, variants=("", "-checkpoint"))
            return True
        except ValueError:
            return False

    longest = max(n for n in range(1, 300) if accepted(n))
    assert not accepted(longest + 1) and longest > 100
    stem = "a" * longest
    for file in (f"{stem}.safetensors", f"{stem}-checkpoint.safetensors"):
        assert load_concept(save_concept(concept, tmp_path / file)).trigger == concept.trigger


def test_plain_save_names_are_accepted():
    assert safe_file_name("my teddy v2") == "my teddy v2.safetensors"
    assert safe_file_name("hugsy.safetensors") == "hugsy.safetensors"


def test_cli_info_and_export(tmp_path, concept):
    path = save_concept(concept, tmp_path / "hugsy.safetensors")
    run = lambda *args: subprocess.run([sys.executable, "-m", "perfusion_ops", *args], cwd=REPO,
                                       capture_output=True, text=True)
    info = run("info", str(path))
    assert info.returncode == 0, info.stderr
    assert "trigger         hugsy" in info.stdout and "16 cross-attention layers" in info.stdout
    assert f"({path.stat().st_size / 1024:.1f} KB)" in info.stdout
    assert "training gate   beta 0.75, tau 0.1, on every token (Eq. 3)" in info.stdout, info.stdout
    opening = save_concept(replace(concept, gate_window=77), tmp_path / "opening.safetensors")
    assert "tau 0.1, first-opening over 77-token windows" in run("info", str(opening)).stdout
    out = tmp_path / "emb.safetensors"
    assert run("export-embedding", str(path), str(out)).returncode == 0
    assert load_file(out)["emb_params"].shape == (1, 768)
    bad = run("info", str(tmp_path / "nope.safetensors"))
    assert bad.returncode == 2 and "does not exist" in bad.stdout


def test_an_sdxl_concept_file_holds_70_layers_in_at_most_192_kb(tmp_path):
    """SDXL (issue 14): 2048-wide i, q, e_sup and trigger vector (a CLIP-L and a bigG row), o_V for 70 layers; the
    info command says so, and the exported embedding has SDXL's two-encoder layout."""
    sdxl = random_concept(layers=SDXL_LAYERS, width=SDXL_TEXT_WIDTH)
    assert len(SDXL_LAYERS) == 70 and {k: v.shape for k, v in sdxl.embedding_parts().items()} == {
        "l": (1, 768), "g": (1, 1280)}
    path = save_concept(sdxl, tmp_path / "sdxl.safetensors")
    assert path.stat().st_size <= 192 * 1024, path.stat().st_size
    loaded = load_concept(path)
    assert loaded.text_encoder == "clip-l+clip-g" and loaded.width == 2048
    info = subprocess.run([sys.executable, "-m", "perfusion_ops", "info", str(path)], cwd=REPO,
                          capture_output=True, text=True)
    assert info.returncode == 0 and "70 cross-attention layers (widths 640, 1280)" in info.stdout, info.stdout
    exported = load_file(export_embedding(loaded, tmp_path / "sdxl-ti.safetensors"))
    assert torch.equal(torch.cat([exported["clip_l"], exported["clip_g"]], -1), loaded.embedding.float())


def test_a_trigger_embedding_of_another_width_than_its_encoder_is_refused(concept):
    """An SDXL file whose trigger vector is CLIP-L wide would leave bigG's token list without its row."""
    concept.text_encoder = "clip-l+clip-g"
    with pytest.raises(ConceptError):
        concept.validate()  # i, q, e_sup are 768 wide too: the first check already refuses
    sdxl = random_concept(layers=SDXL_LAYERS, width=SDXL_TEXT_WIDTH)
    sdxl.embedding = sdxl.embedding[:, :768]
    with pytest.raises(ConceptError, match="the trigger embedding is 768 wide, but clip-l\\+clip-g takes 2048-wide"):
        sdxl.validate()


def test_serialisation_refuses_invalid_concepts(concept):
    concept.trigger = " "
    with pytest.raises(ConceptError, match="empty trigger"):
        concept_to_bytes(concept)
