"""Reliability and security in the real host: what a node may read, what a route may parse, when a bad input is
refused (before any work), and that a strength-0 concept is no concept at all."""
from __future__ import annotations

import asyncio
import json
import os
import threading
import urllib.error
import urllib.parse

import pytest
import torch

from graphs import train_graph


@pytest.fixture(scope="module")
def loaded(comfy, small_checkpoint):
    with torch.inference_mode():
        return comfy.node("CheckpointLoaderSimple")().load_checkpoint(small_checkpoint.name)[:3]


def train_kwargs(loaded, **changes):
    """Direct-call arguments of Perfusion Train Concept (tiny CPU settings), with ``changes``."""
    import skimage.data

    model, clip, vae = loaded
    photo = torch.from_numpy(skimage.data.chelsea()[None].astype("float32") / 255)
    kwargs = dict(model=model, clip=clip, vae=vae, images=photo, trigger_word="hugsy", superclass="cat", steps=1,
                  batch_size=1, grad_accum=1, lr_values=0.03, lr_embedding=0.006, train_beta=0.75, train_tau=0.1,
                  flip=False, resolution=64, seed=0, save_name="reliability", checkpoint_every=0,
                  covariance_captions=16)
    return kwargs | changes


def refused_before_training(comfy, kwargs, timeout=60):
    """The ValueError the Train node raises for ``kwargs``; fails if it blocks, trains or raises anything else."""
    result = {}

    def train():
        try:
            with torch.inference_mode():
                comfy.node("PerfusionTrainConcept")().train(**kwargs)
        except BaseException as err:  # noqa: BLE001  (handed to the test)
            result["error"] = err

    comfy.progress.clear()
    worker = threading.Thread(target=train, daemon=True)
    worker.start()
    worker.join(timeout)
    assert not worker.is_alive(), "the node blocked"
    assert not comfy.progress, "the node started working before refusing the input"
    error = result.get("error")
    assert isinstance(error, ValueError), repr(error)
    return str(error)


# ----------------------------------------------------------------------------------------------- caption files
@pytest.fixture
def captions_folder(comfy):
    folder = comfy.layout.folder("perfusion") / "captions"
    assert folder.is_dir(), "the captions folder is created when the pack loads"
    made = []

    def add(name, make):
        path = folder / name
        make(path)
        made.append(path)
        comfy.refresh_models()
        return path

    yield add
    for path in made:
        path.rmdir() if path.is_dir() else path.unlink()
    comfy.refresh_models()


def test_captions_file_offers_the_caption_folder_with_the_builtin_corpus_first(comfy, captions_folder):
    captions_folder("laion-sample.txt", lambda p: p.write_text("a red bus\na cat on a mat\n", encoding="utf-8"))
    spec = comfy.node("PerfusionTrainConcept").INPUT_TYPES()
    assert "captions_file" in spec["optional"]
    choices, options = spec["optional"]["captions_file"]
    assert choices[0] == "" and options["default"] == "" and "laion-sample.txt" in choices
    assert comfy.adapter.train.covariance_captions_for("laion-sample.txt", 16) == ["a red bus", "a cat on a mat"]


def test_old_prompts_with_an_empty_captions_file_still_validate(comfy, small_checkpoint, photo_name):
    comfy.validate(train_graph(small_checkpoint.name, photo_name, "hugsy", "cat", "x", captions_file=""))


HOSTILE_CAPTIONS = ["/etc/passwd", "../../../../../../etc/passwd", "../perfusion/hugsy.safetensors", "/dev/zero",
                    "captions/../../../.ssh/id_rsa"]


@pytest.mark.parametrize("value", HOSTILE_CAPTIONS)
def test_a_prompt_naming_a_path_is_refused(comfy, small_checkpoint, photo_name, value):
    """Current trees refuse the value at validation (not in the combo); the 2024 tree validates required inputs
    only, so there the node refuses it before any work."""
    graph = train_graph(small_checkpoint.name, photo_name, "hugsy", "cat", "refused", captions_file=value)
    with pytest.raises(Exception) as failure:
        comfy.run(graph)
    message = str(failure.value)
    assert "captions_file" in message or "is not in models/perfusion/captions" in message, message[:2000]
    assert not (comfy.layout.folder("perfusion") / "refused.safetensors").exists()


@pytest.mark.parametrize("value", HOSTILE_CAPTIONS)
def test_a_direct_call_reads_nothing_outside_the_caption_folder(comfy, loaded, value):
    message = refused_before_training(comfy, train_kwargs(loaded, captions_file=value))
    assert "is not in models/perfusion/captions" in message
    assert str(comfy.layout.base) not in message and "root:" not in message


def _fifo(path):
    if not hasattr(os, "mkfifo"):
        pytest.skip("no FIFOs on this system")
    os.mkfifo(path)


@pytest.mark.parametrize("case,make,message", [
    ("fifo", _fifo, "models/perfusion/captions"),
    ("directory", lambda p: p.mkdir(), "models/perfusion/captions"),
    ("latin-1", lambda p: p.write_bytes("un café\n".encode("latin-1")), "not UTF-8 text"),
    ("comments only", lambda p: p.write_text("# nothing here\n\n", encoding="utf-8"), "has no captions"),
])
def test_unusable_caption_files_in_the_folder_are_refused_before_training(comfy, loaded, captions_folder, case,
                                                                          make, message):
    path = captions_folder(f"bad-{case.replace(' ', '-')}.txt", make)
    try:
        text = refused_before_training(comfy, train_kwargs(loaded, captions_file=path.name))
    finally:
        if case == "fifo":  # unblock a reader stuck in open() (the unfixed node), so the thread ends
            try:
                os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))
            except OSError:
                pass
    assert message in text and f"'{path.name}'" in text and str(comfy.layout.base) not in text


# ------------------------------------------------------------------------------------------ covariance cache
def test_the_covariance_cache_is_keyed_on_the_captions_it_was_estimated_from(comfy, loaded, captions_folder):
    """Two caption files of the same length give two Cs; the same file again is a cache hit."""
    words = {"animals": ("cat", "dog", "owl", "fox"), "vehicles": ("bus", "car", "boat", "train")}
    files = {kind: captions_folder(f"{kind}.txt", lambda p, w=w: p.write_text(
        "".join(f"a photo of a {x} {where}\n"
                for x in w for where in ("on a beach", "at night", "in snow", "indoors")),
        encoding="utf-8")).name for kind, w in words.items()}
    train = comfy.adapter.train
    model, clip, _ = loaded
    with torch.inference_mode(False):
        host = comfy.adapter.training_host.ComfyTrainingHost(model, clip)
        inverse = {kind: train.inverse_covariance(host, train.covariance_captions_for(name, 16))
                   for kind, name in files.items()}
        again = train.inverse_covariance(host, train.covariance_captions_for(files["animals"], 16))
    change = (inverse["animals"] - inverse["vehicles"]).norm() / inverse["animals"].norm()
    assert change > 0.05, f"the second caption file reused the first C (relative change {float(change):.2g})"
    assert torch.equal(again, inverse["animals"]), "a cache hit must give the C the first run used"


# ----------------------------------------------------------------------------------------- concept_info route
def test_concept_info_parses_off_the_event_loop(comfy, concept_files, monkeypatch):
    """While one concept file is being parsed, the server's loop answers other requests."""
    from aiohttp.test_utils import make_mocked_request

    routes = comfy.adapter.routes
    handler = next(r.handler for r in comfy.prompt_server.routes if getattr(r, "path", None) == routes.ROUTE)
    parsing, release = threading.Event(), threading.Event()
    load = routes.load_concept

    def slow_load(*args, **kwargs):  # a file that takes long to parse
        parsing.set()
        release.wait(10)
        return load(*args, **kwargs)

    monkeypatch.setattr(routes, "load_concept", slow_load)

    def request(name):
        return handler(make_mocked_request("GET", f"{routes.ROUTE}?{urllib.parse.urlencode({'name': name})}"))

    async def scenario():
        slow = asyncio.ensure_future(request(concept_files["hugsy"]))
        while not parsing.is_set():
            await asyncio.sleep(0.01)
        other = await request("no-such-concept.safetensors")  # served by the loop meanwhile
        still_parsing = not slow.done()
        release.set()
        return still_parsing, other, await slow

    still_parsing, other, slow = comfy.loop.run_until_complete(asyncio.wait_for(scenario(), 60))
    assert other.status == 404 and slow.status == 200
    assert still_parsing, "the event loop waited for the parse: every request and websocket stalled meanwhile"


def _tensor_entries(count):
    return {f"o_v.t{n}": {"dtype": "F16", "shape": [1], "data_offsets": [2 * n, 2 * n + 2]} for n in range(count)}


def _safetensors(header, data=b""):
    header = json.dumps(header).encode() if isinstance(header, dict) else header
    return len(header).to_bytes(8, "little") + header + data


HOSTILE_CONCEPTS = {  # file name → (bytes, what the answer must say)
    "many-tensors.safetensors": (lambda: _safetensors(_tensor_entries(150_000), bytes(300_000)),
                                 "KB header: a Perfusion concept's is at most"),
    "600-tensors.safetensors": (lambda: _safetensors(_tensor_entries(600), bytes(1200)),
                                "holds 600 tensors: a Perfusion concept holds at most"),
    "nested.safetensors": (lambda: _safetensors(b'{"__metadata__": ' + b"[" * 30_000 + b"]" * 30_000 + b"}", b"\0\0"),
                           "nested too deeply"),
    "int8.safetensors": (lambda: _safetensors({"i": {"dtype": "I8", "shape": [768], "data_offsets": [0, 768]}},
                                              bytes(768)), "tensor 'i' is I8"),
    "pickle.safetensors": (lambda: b"\x80\x04" + bytes(64), "pickle"),
}


@pytest.mark.parametrize("name", [*HOSTILE_CONCEPTS, "../../../../etc/passwd", "/etc/passwd", "..%2F..%2Fsecret"])
def test_concept_info_answers_hostile_files_with_a_reason_and_keeps_serving(server, name):
    folder = server.layout.folder("perfusion")
    if name in HOSTILE_CONCEPTS:
        (folder / name).write_bytes(HOSTILE_CONCEPTS[name][0]())
    try:
        server.get(f"/perfusion/concept_info?{urllib.parse.urlencode({'name': name})}", timeout=20)
        pytest.fail("a hostile file was answered as a concept")
    except urllib.error.HTTPError as answer:
        status, body = answer.code, json.loads(answer.read())
    if name in HOSTILE_CONCEPTS:
        assert status == 422 and HOSTILE_CONCEPTS[name][1] in body["error"] and f"'{name}'" in body["error"], body
    else:  # outside the folder: the same answer as for a missing file, nothing about the path
        assert status == 404 and "is not in models/perfusion" in body["error"] and "root:" not in body["error"], body
    assert "PerfusionApply" in server.get("/object_info", timeout=20)  # the server still serves


# ------------------------------------------------------------------------------------------------- save names
@pytest.mark.parametrize("save_name,checkpoint_every,message", [
    ("名" * 100, 0, "too long for this file system"),  # 100 characters, 300 bytes
    ("a" * 225, 1, "too long for this file system"),  # fits alone; not as <name>-checkpoint's temporary file
    ("CON", 0, "reserved device name"),
    ("nul.v2", 0, "reserved device name"),
])
def test_train_refuses_a_save_name_before_training(comfy, loaded, save_name, checkpoint_every, message):
    text = refused_before_training(comfy, train_kwargs(loaded, save_name=save_name, checkpoint_every=checkpoint_every))
    assert message in text
    assert not [p for p in comfy.layout.folder("perfusion").iterdir() if p.name.startswith((".", save_name[:10]))]


def test_export_refuses_a_name_the_file_system_cannot_hold(comfy, concept_files):
    with pytest.raises(ValueError, match="too long for this file system"):
        comfy.node("PerfusionExportEmbedding")().export(concept_files.concept("hugsy"), "名" * 100)


# ------------------------------------------------------------------------------------------------- strength 0
def test_apply_at_strength_zero_is_no_concept(comfy, loaded, concept_files):
    """Chained after hugsy, zorbo at strength 0 leaves hugsy's edit bit for bit; alone, it leaves the model's own
    projections (README: 0 leaves the model exactly as without it)."""
    from test_inference import apply, projections

    model, clip, _ = loaded
    a, b = concept_files.concept("hugsy"), concept_files.concept("zorbo")
    context = torch.randn(2, 77, 768) * 0.5
    context[0, 5], context[1, 7] = a.target_input, b.target_input
    hugsy = apply(comfy, model, clip, a, 0.6, 0.15)
    alone = projections(comfy, hugsy[0], context)
    with_off = projections(comfy, apply(comfy, *hugsy, b, 0.6, 0.15, strength=0.0)[0], context)
    plain = projections(comfy, model, context)
    only_off = projections(comfy, apply(comfy, model, clip, b, 0.6, 0.15, strength=0.0)[0], context)
    for layer in plain:
        assert all(torch.equal(x, y) for x, y in zip(with_off[layer], alone[layer])), layer
        assert all(torch.equal(x, y) for x, y in zip(only_off[layer], plain[layer])), layer
