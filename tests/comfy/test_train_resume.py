"""Resuming training in a real ComfyUI: an interrupted run's checkpoint continues exactly as one run would have (loss
curve included), a finished concept continues with a fresh optimizer, and a file of another concept is refused."""
from __future__ import annotations

import pytest
import torch

from perfusion_ops.concept_file import load_concept, load_training_state

from graphs import train_graph

RUN = {"steps": 4, "seed": 3, "checkpoint_every": 1}  # one run of 4 steps, or 2 steps, interrupted, and 2 resumed


@pytest.fixture
def messages(comfy, monkeypatch):
    """The ``perfusion.train`` messages to the front end during the next runs."""
    seen = []
    send = comfy.prompt_server.send_sync
    monkeypatch.setattr(comfy.prompt_server, "send_sync", lambda event, data, *a, **k: (
        event == "perfusion.train" and seen.append(data), send(event, data, *a, **k)))
    return seen


def test_a_resumed_checkpoint_continues_the_run_and_its_loss_curve(comfy, small_checkpoint, photo_name, monkeypatch,
                                                                 messages):
    folder = comfy.layout.folder("perfusion")
    graph = lambda name, **more: train_graph(small_checkpoint.name, photo_name, "resumy", "cat", name,  # noqa: E731
                                             **RUN, **more)
    whole, whole_chart = comfy.run(graph("resumy-whole"), fresh=True)["train"]
    whole_losses = [m["loss"] for m in messages]

    # the same run with previews on, Cancel pressed at step 2: its checkpoint holds the state after step 2
    monkeypatch.setattr(comfy.adapter.previews, "SAMPLER_STEPS", 2)
    update = comfy.comfy.utils.ProgressBar.update_absolute

    def cancel_at_step_2(self, value, total=None, preview=None):
        update(self, value, total, preview)
        if (value, total) == (2, RUN["steps"]):
            comfy.model_management.interrupt_current_processing(True)

    monkeypatch.setattr(comfy.comfy.utils.ProgressBar, "update_absolute", cancel_at_step_2)
    with pytest.raises(Exception):
        comfy.run(graph("resumy", preview_every=1), fresh=True)
    monkeypatch.setattr(comfy.comfy.utils.ProgressBar, "update_absolute", update)
    checkpoint = folder / "resumy-checkpoint.safetensors"
    assert not (folder / "resumy.safetensors").exists() and not (folder / "resumy.png").exists()
    concept, state = load_training_state(checkpoint)
    assert state.step == 2 and state.losses.tolist() == pytest.approx(whole_losses[:2], rel=1e-6)

    messages.clear()
    comfy.refresh_models()
    resumed, resumed_chart = comfy.run(graph("resumy", resume_from=checkpoint.name), fresh=True)["train"]
    assert [p for p in comfy.progress if p[1] == RUN["steps"]][0] == (2, RUN["steps"]), "the bar did not start at 2"
    assert [m["step"] for m in messages] == [3, 4]
    assert messages[0]["earlier"] == pytest.approx(whole_losses[:2], rel=1e-6) and messages[0]["first"] == 1
    assert [m["loss"] for m in messages] == pytest.approx(whole_losses[2:], rel=1e-5)
    for name, tensor in whole.learned.items():
        assert torch.allclose(resumed.learned[name], tensor, rtol=1e-5, atol=1e-6), name
    assert torch.allclose(resumed.target_input, whole.target_input, rtol=1e-5, atol=1e-6)
    assert torch.allclose(resumed_chart, whole_chart, atol=2 / 255)  # the chart shows all 4 steps
    assert not checkpoint.exists(), "the finished run left its checkpoint"
    saved = load_concept(folder / "resumy.safetensors")
    assert saved.info["steps"] == "4"


def test_a_finished_concept_trains_on_with_a_fresh_optimizer(comfy, small_checkpoint, photo_name, concept_files,
                                                            messages):
    graph = train_graph(small_checkpoint.name, photo_name, "hugsy", "cat", "hugsy-more", steps=3,
                        resume_from=concept_files["hugsy"])
    with comfy.capture_logs() as logs:
        concept, chart = comfy.run(graph, fresh=True)["train"]
    assert any("resuming from hugsy.safetensors at step 2 of 3" in line and "optimizer starts afresh" in line
               for line in logs), logs
    assert [(m["step"], m.get("earlier"), m.get("first")) for m in messages] == [(3, [], 3)]
    start = concept_files.concept("hugsy")
    assert not torch.equal(concept.embedding, start.embedding) and concept.info["steps"] == "3"


def call_train(comfy, loaded, **changes):
    model, clip, vae = loaded
    import skimage.data
    photo = torch.from_numpy(skimage.data.chelsea()[None].astype("float32") / 255)
    kwargs = dict(model=model, clip=clip, vae=vae, images=photo, trigger_word="hugsy", superclass="cat", steps=5,
                  batch_size=1, grad_accum=1, lr_values=0.03, lr_embedding=0.006, train_beta=0.75, train_tau=0.1,
                  flip=False, resolution=64, seed=0, save_name="refused", checkpoint_every=0, covariance_captions=16,
                  preview_every=0)
    kwargs |= changes
    with torch.inference_mode():
        return comfy.node("PerfusionTrainConcept")().train(**kwargs)


@pytest.fixture(scope="module")
def loaded(comfy, small_checkpoint):
    with torch.inference_mode():
        return comfy.node("CheckpointLoaderSimple")().load_checkpoint(small_checkpoint.name)[:3]


def skipped_clip(clip):
    clip = clip.clone()
    clip.clip_layer(-2)
    return clip


@pytest.mark.parametrize("changes,message", [
    ({"trigger_word": "kitto"}, "its trigger word is 'hugsy' where this run's is 'kitto'"),
    ({"superclass": "dog"}, "its superclass is 'cat' where this run's is 'dog'"),
    ({"trained_k": True}, "its K mode is 'keys locked' where this run's is 'trained K'"),
    ({"clip": skipped_clip}, "its CLIP layer is '-1' where this run's is '-2'"),
    ({"steps": 2}, "it has 2 steps already: set steps above 2"),
])
def test_resuming_another_concept_is_refused_with_the_reason(comfy, loaded, concept_files, changes, message):
    changes = {k: v(loaded[1]) if callable(v) else v for k, v in changes.items()}
    with pytest.raises(ValueError, match=f"cannot resume from 'hugsy.safetensors': {message}"):
        call_train(comfy, loaded, resume_from=concept_files["hugsy"], **changes)
    assert not (comfy.layout.folder("perfusion") / "refused.safetensors").exists()


def test_resume_names_only_files_of_the_concept_folder(comfy, loaded):
    with pytest.raises(ValueError, match="'nope.safetensors' is not in models/perfusion"):
        call_train(comfy, loaded, resume_from="nope.safetensors")
