"""The host-agnostic training loop on a tiny cross-attention denoiser: it learns, and learns only what it should."""
import random

import pytest
import torch

from perfusion_ops.training import Sample, TrainSettings, Trainer, masked_noise_loss, normalise_masks, prompts_for, run
from toy_host import WIDTH, ToyHost


def make(trained_k=False, steps=80, **overrides):
    host = ToyHost()
    settings = TrainSettings(steps=steps, batch_size=4, grad_accum=1, trained_k=trained_k, **overrides)
    trainer = Trainer(host, "hugsy", "teddy", torch.eye(WIDTH), settings, {"text_encoder": "toy", "model_family": "toy"})
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
