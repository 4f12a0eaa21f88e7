"""The host-agnostic training loop on a tiny cross-attention denoiser: it learns, and learns only what it should;
it resumes exactly from its training state; preview renders leave it unchanged."""
import random
from dataclasses import replace

import pytest
import torch

from perfusion_ops.concept import ConceptError
from perfusion_ops.concept_file import concept_to_bytes, load_training_state
from perfusion_ops.sampling import ddim_sample
from perfusion_ops.training import Sample, TrainSettings, Trainer, masked_noise_loss, normalise_masks, prompts_for, run
from toy_host import WIDTH, ToyHost


def make(trained_k=False, steps=80, **overrides):
    host = ToyHost()
    settings = TrainSettings(steps=steps, batch_size=4, grad_accum=1, trained_k=trained_k, **overrides)
    trainer = Trainer(host, "hugsy", "teddy", torch.eye(WIDTH), settings,
                      {"text_encoder": "toy", "model_family": "toy"})
    target = 2 * torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(1)).expand(3, -1, -1, -1)

    def draw(rng, n):
        index = [rng.randrange(len(target)) for _ in range(n)]
        return Sample(target[index], None, prompts_for("hugsy", rng, n))

    fixed = Sample(target, None, ["a photo of a hugsy"] * 3)
    noise = torch.randn(target.shape, generator=torch.Generator().manual_seed(2))
    timesteps = torch.tensor([10, 50, 90])
    return host, trainer, draw, (fixed, noise, timesteps)


def test_training_lowers_the_fixed_loss_and_changes_only_what_it_learns():
    host, trainer, draw, fixed = make()
    frozen = {name: t.clone() for name, t in host.state_dict().items()}
    before, start = trainer.evaluate(*fixed), trainer.concept()
    result = run(trainer, draw)
    after = trainer.evaluate(*fixed)
    assert after < 0.95 * before, (before, after)
    assert all(torch.equal(t, host.state_dict()[name]) for name, t in frozen.items())  # host weights frozen
    end = result.concept
    assert not torch.equal(end.embedding, start.embedding)
    assert all(not torch.equal(end.value_outputs[l], start.value_outputs[l]) for l in host.layers)
    assert end.key_outputs is None  # key-locked: o_K is not learned, not stored
    assert torch.equal(end.superclass_encoding, start.superclass_encoding)
    assert len(result.losses) == 80 and all(l == l for l in result.losses)
    end.validate()


def test_target_input_follows_the_trigger_encodings_by_ema():
    host, trainer, draw, _ = make(steps=1, ema_decay=0.9)
    i0 = trainer.params.target_input.clone()
    sample = draw(random.Random(0), 4)
    _, encodings = host.encode(sample.prompts, "hugsy", trainer.params.embedding)
    trainer.params.track(encodings, 0.9)
    assert torch.allclose(trainer.params.target_input, 0.9 * i0 + 0.1 * encodings.mean(0), atol=1e-6)


def test_trained_k_learns_key_outputs():
    host, trainer, draw, _ = make(trained_k=True, steps=5)
    start = trainer.concept()
    end = run(trainer, draw).concept
    assert end.trained_keys and any(not torch.equal(end.key_outputs[l], start.key_outputs[l]) for l in host.layers)


def test_masked_loss_weights_by_normalised_mask():
    prediction, noise = torch.zeros(2, 1, 2, 2), torch.ones(2, 1, 2, 2)
    weights = normalise_masks(torch.tensor([[[[0.0, 2.0], [2.0, 2.0]]], [[[1.0, 1.0], [1.0, 1.0]]]]))
    assert torch.equal(weights[0, 0], torch.tensor([[0.0, 1.0], [1.0, 1.0]]))
    assert masked_noise_loss(prediction, noise, weights) == pytest.approx(7 / 8)
    with pytest.raises(ValueError, match="empty"):
        normalise_masks(torch.zeros(1, 1, 2, 2))


@pytest.mark.parametrize("field,value", [("steps", 0), ("batch_size", 0), ("lr_values", -1.0), ("train_tau", 0.0)])
def test_bad_settings_are_refused(field, value):
    with pytest.raises(Exception, match="must|τ"):
        TrainSettings(**{field: value}).check()


# ------------------------------------------------------------------------------------------ resume and previews
def checkpoint_round_trip(trainer, tmp_path):
    """The trainer's concept and state through a checkpoint file (float32), as the Train node writes it."""
    path = tmp_path / "hugsy-checkpoint.safetensors"
    path.write_bytes(concept_to_bytes(trainer.concept(), torch.float32, trainer.state()))
    return load_training_state(path)


def assert_same_concept(a, b):
    for name, tensor in a.learned.items():
        assert torch.equal(tensor, b.learned[name]), name
    assert torch.equal(a.target_input, b.target_input) and torch.equal(a.target_key, b.target_key)


@pytest.mark.parametrize("trained_k", [False, True])
def test_resuming_a_checkpoint_continues_exactly_as_one_run(tmp_path, trained_k):
    _, whole, draw, _ = make(trained_k=trained_k, steps=7)
    one_run = run(whole, draw)
    host, first, draw, _ = make(trained_k=trained_k, steps=7)  # its checkpoint at step 3 (the run's settings: its
    with host.install(first.forwards()):                      # EMA decay depends on the steps)
        for _ in range(3):
            first.step(draw)
    concept, state = checkpoint_round_trip(first, tmp_path)
    assert state.step == 3 and len(state.losses) == 3
    _, second, draw, _ = make(trained_k=trained_k, steps=7)
    second.resume(concept, state)
    resumed = run(second, draw)
    assert resumed.losses == pytest.approx(one_run.losses, rel=1e-6)  # the first three were stored as float32
    assert resumed.losses[3:] == one_run.losses[3:]
    assert_same_concept(resumed.concept, one_run.concept)
    assert second.first_logged == 1


def test_resuming_a_finished_concept_continues_its_steps_with_a_fresh_optimizer():
    _, first, draw, _ = make(steps=3)
    finished = run(first, draw).concept
    _, second, draw, fixed = make(steps=5)
    before = second.evaluate(*fixed)
    second.resume(finished, done=3)
    assert second.done == 3 and second.losses == [] and not second.optimizer.state
    assert second.evaluate(*fixed) != before  # it starts from the finished concept, not from the superclass
    result = run(second, draw)
    assert len(result.losses) == 2 and second.first_logged == 4 and second.state().step == 5
    assert len(second.state().losses) == 2  # Adam's own steps: a checkpoint of this run resumes exactly too


def test_each_step_draws_from_streams_of_its_seed_and_number():
    _, trainer, _, _ = make(seed=4)
    a, b = trainer.streams(3), trainer.streams(3)
    assert (a[0].random() == b[0].random()
            and torch.equal(torch.randn(4, generator=a[1]), torch.randn(4, generator=b[1])))
    assert trainer.streams(4)[0].random() != trainer.streams(3)[0].random()
    assert make(seed=5)[1].streams(3)[0].random() != trainer.streams(3)[0].random()


@pytest.mark.parametrize("change,message", [
    (lambda c: replace(c, trigger="kitto"), "trigger word is 'kitto' where this run's is 'hugsy'"),
    (lambda c: replace(c, superclass="cat"), "superclass is 'cat' where this run's is 'teddy'"),
    (lambda c: replace(c, clip_layer=-2), "CLIP layer is '-2' where this run's is '-1'"),
    (lambda c: replace(c, gate_window=8), "gate window is '8' where this run's is '0'"),
    (lambda c: replace(c, key_outputs=dict(c.value_outputs)),
     "K mode is 'trained K' where this run's is 'keys locked'"),
    (lambda c: replace(c, value_outputs={"first": c.value_outputs["first"]}), "1 cross-attention layers are not"),
    (lambda c: replace(c, value_outputs={k: torch.zeros(8) for k in c.value_outputs}), "2 cross-attention layers"),
])
def test_resuming_another_concept_is_refused(change, message):
    _, first, draw, _ = make(steps=1)
    concept = change(run(first, draw).concept)
    _, second, _, _ = make(steps=3)
    second.fields["clip_layer"] = -1
    with pytest.raises(ConceptError, match=message):
        second.resume(concept, done=1)


def test_resuming_needs_steps_left(tmp_path):
    _, first, draw, _ = make(steps=2)
    run(first, draw)
    concept, state = checkpoint_round_trip(first, tmp_path)
    _, second, _, _ = make(steps=2)
    with pytest.raises(ConceptError, match="it has 2 steps already: set steps above 2"):
        second.resume(concept, state)
    with pytest.raises(ConceptError, match="no step count"):
        second.resume(concept, None, None)


def test_previews_render_the_current_concept_and_leave_training_unchanged():
    host, plain, draw, _ = make(steps=4)
    plain_result = run(plain, draw)
    host, trainer, draw, _ = make(steps=4)
    uncond = torch.zeros(1, 8, WIDTH)
    noise = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(9))
    renders = []

    def preview(step, loss):
        training = dict(trainer.live)
        with trainer.applied() as concept:
            assert not torch.is_grad_enabled() and concept.recommended("local") == (0.7, 0.15)
            context, _ = host.encode(["a photo of a hugsy", "a red hugsy"], "hugsy", trainer.params.embedding)
            renders.append(ddim_sample(host.predict_noise, host.alphas_cumprod, noise, context, uncond, 3, 7.0))
        assert trainer.live == training  # training's edit is back

    result = run(trainer, draw, on_step=preview)
    assert result.losses == plain_result.losses
    assert_same_concept(result.concept, plain_result.concept)
    assert len(renders) == 4 and all(r.shape == noise.shape and bool(r.isfinite().all()) for r in renders)
    assert not torch.equal(renders[0], renders[-1])  # the concept moved, and the renders with it


def test_ddim_with_a_perfect_noise_model_recovers_its_image():
    alphas = torch.linspace(0.999, 0.01, 100)
    clean = torch.randn(2, 4, 3, 3, generator=torch.Generator().manual_seed(1))
    noise = torch.randn(2, 4, 3, 3, generator=torch.Generator().manual_seed(2))

    def predict(x, t, context):  # the exact ε of a data distribution concentrated on ``clean``
        a = alphas[t].view(-1, 1, 1, 1)
        return (x - a.sqrt() * torch.cat([clean, clean])) / (1 - a).sqrt()

    out = ddim_sample(predict, alphas, noise, torch.zeros(2, 5, 8), torch.zeros(1, 5, 8), steps=4, guidance=3.0)
    assert torch.allclose(out, clean, atol=1e-5)
