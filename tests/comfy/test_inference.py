"""Load / Apply / Global Key Lock / Export in a real ComfyUI: behaviour against unpatched runs and the core's maths."""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file

from perfusion_ops.edit import AppliedConcept, JointEdit

from graphs import sampling_graph

PROMPT = "a photo of a {} sitting on a wooden table, studio light"


def latent(result):
    return result["k"][0]["samples"]


@pytest.fixture(scope="module")
def loaded(comfy, small_checkpoint):
    """(MODEL, CLIP) of the small checkpoint, loaded once through ComfyUI's own loader."""
    with torch.inference_mode():
        return comfy.node("CheckpointLoaderSimple")().load_checkpoint(small_checkpoint.name)[:2]


def apply(comfy, model, clip, concept, beta=0.7, tau=0.15, **optional):
    with torch.inference_mode():
        return comfy.node("PerfusionApply")().apply(model, clip, concept, beta, tau, "local", **optional)


def sample_hooked(comfy, model, hooks, steps, cond, negative, latent_in):
    """ComfyUI's KSampler (euler, cfg 5, seed 0) on ``model`` while ``hooks`` watch; they are removed after."""
    try:
        with torch.inference_mode():
            comfy.nodes.common_ksampler(model, 0, steps, 5.0, "euler", "normal", cond, negative, latent_in)
    finally:
        for h in hooks:
            h.remove()


def projections(comfy, model, context):
    """Outputs of every attn2 to_k/to_v of ``model`` (loaded, so its patches are live) for ``context``."""
    comfy.model_management.load_models_gpu([model])
    unet = model.model.diffusion_model
    out = {}
    with torch.inference_mode():
        for name, module in unet.named_modules():
            if name.endswith("attn2"):
                out[name] = (module.to_k(context).clone(), module.to_v(context).clone())
    return out


def test_pack_loads_and_nodes_are_listed(comfy, server):
    assert comfy.pack is not None, comfy.pack_error
    info = server.get("/object_info")
    for name in ("PerfusionLoadConcept", "PerfusionApply", "PerfusionGlobalKeyLock", "PerfusionExportEmbedding",
                 "PerfusionTrainConcept"):
        assert name in info, name
        assert info[name]["category"] == "perfusion"
        for spec in info[name]["input"]["required"].values():
            assert "tooltip" in spec[1], (name, spec)


def test_gate_is_shut_without_trigger_and_open_with_it(comfy, small_checkpoint, concept_files):
    a = concept_files["hugsy"]
    # "car": neither the trigger nor its superclass (whose encoding the concept's i starts from)
    plain = latent(comfy.run(sampling_graph(small_checkpoint.name, PROMPT.format("car"))))
    patched = latent(comfy.run(sampling_graph(small_checkpoint.name, PROMPT.format("car"), [(a, 0.7, 0.15)])))
    triggered = latent(comfy.run(sampling_graph(small_checkpoint.name, PROMPT.format("hugsy"), [(a, 0.7, 0.15)])))
    # Without the trigger word the gates stay (nearly) shut: e⊥ removes each token's small component along i,
    # so the latent moves by a fraction of what the trigger itself does.
    quiet = (patched - plain).abs().max() / plain.abs().max()
    loud = (triggered - plain).abs().max() / plain.abs().max()
    print(f"relative latent change: no trigger {float(quiet):.2e}, trigger {float(loud):.2e}")
    assert quiet < 0.05, float(quiet)
    assert loud > 5 * quiet and loud > 0.01, (float(loud), float(quiet))


def test_no_patch_leaks_into_other_branches(comfy, loaded, small_checkpoint, concept_files):
    model, clip = loaded
    before_keys, tokenizer = dict(model.object_patches), clip.tokenizer
    graph = sampling_graph(small_checkpoint.name, PROMPT.format("cat"), seed=3)
    first = latent(comfy.run(graph, fresh=True))
    perfusion = sampling_graph(small_checkpoint.name, PROMPT.format("hugsy"), [(concept_files["hugsy"], 0.6, 0.15)],
                               seed=3)
    for order in range(2):  # plain after perfusion, then perfusion after plain
        comfy.run(perfusion, fresh=True)
        again = latent(comfy.run(graph, fresh=True))
        assert torch.equal(first, again), f"plain graph changed after a Perfusion graph (round {order})"
    apply(comfy, model, clip, concept_files.concept("hugsy"))
    assert model.object_patches == before_keys and clip.tokenizer is tokenizer
    assert not any("forward" in m.__dict__ and "Patched" in type(m.__dict__["forward"]).__name__
                   for m in projections_modules(comfy, model))


def projections_modules(comfy, model):
    comfy.model_management.load_models_gpu([model])
    return [m for n, m in model.model.diffusion_model.named_modules() if n.endswith(("to_k", "to_v"))]


def test_chaining_is_order_free_and_equals_the_core_joint_edit(comfy, loaded, concept_files):
    model, clip = loaded
    a, b = concept_files.concept("hugsy"), concept_files.concept("zorbo")
    ab = apply(comfy, *apply(comfy, model, clip, a, 0.6, 0.15), b, 0.7, 0.2)[0]
    ba = apply(comfy, *apply(comfy, model, clip, b, 0.7, 0.2), a, 0.6, 0.15)[0]
    context = torch.randn(2, 77, 768) * 0.5
    context[0, 5] = a.target_input
    context[1, 7] = b.target_input
    got_ab, got_ba = projections(comfy, ab, context), projections(comfy, ba, context)
    assert_core_edit(comfy, model, got_ab, [AppliedConcept(a, 0.6, 0.15), AppliedConcept(b, 0.7, 0.2)], context)
    for layer, (k, v) in got_ab.items():
        assert torch.allclose(got_ba[layer][0], k, atol=1e-5) and torch.allclose(got_ba[layer][1], v, atol=1e-5)
    again = apply(comfy, ab, clip, a, 0.6, 0.15)[0]  # the same concept again replaces, never doubles
    assert [e.concept.trigger for e in comfy.adapter.patching.applied_concepts(again)] == ["zorbo", "hugsy"]


def assert_core_edit(comfy, model, got, applied, context):
    """``got`` (per layer, K and V of a patched clone of ``model``) is the core's joint edit of ``applied``."""
    joint = JointEdit(applied)
    comfy.model_management.load_models_gpu([model])
    unet = model.model.diffusion_model
    for layer, pair in got.items():
        attention = unet.get_submodule(layer)
        for path, have in zip("kv", pair):
            weight = getattr(attention, f"to_{path}").weight
            with torch.inference_mode():
                want = joint.projection(layer, path, lambda x: torch.nn.functional.linear(x, weight))(context)
            assert torch.allclose(have, want, atol=1e-5, rtol=1e-5), (layer, path)


def test_a_first_opening_concept_opens_its_gate_at_its_trigger_only(comfy, loaded, concept_files):
    """A concept file trained with first-opening gates (gate_window 77) is applied with them, as the core computes
    them: the trigger gets the concept, a later token that carries the trigger again does not (Eq. 3's gate would)."""
    model, clip = loaded
    concept = replace(concept_files.concept("hugsy"), gate_window=77)
    context = torch.randn(1, 77, 768) * 0.5
    context[0, 5] = context[0, 9] = concept.target_input
    got = projections(comfy, apply(comfy, model, clip, concept)[0], context)
    eq3 = projections(comfy, apply(comfy, model, clip, replace(concept, gate_window=0))[0], context)
    assert_core_edit(comfy, model, got, [AppliedConcept(concept, 0.7, 0.15)], context)
    for layer, (_, v) in got.items():
        assert torch.allclose(v[0, 5], eq3[layer][1][0, 5], rtol=0.01, atol=1e-3)  # the trigger: Eq. 3's edit
        assert not torch.allclose(v[0, 9], eq3[layer][1][0, 9], rtol=0.05, atol=1e-2)  # the copy: shut


def test_the_recommended_gate_is_the_concept_files(comfy, loaded, concept_files):
    """gate 'recommended (… lock)' applies the file's β/τ for that lock, bit for bit as the widgets set to them;
    without the gate input (API prompts from before it) the widgets count."""
    model, clip = loaded
    concept = replace(concept_files.concept("hugsy"), beta_local=0.55, tau_local=0.07, beta_global=0.35,
                      tau_global=0.2)
    context = torch.randn(1, 77, 768) * 0.5
    context[0, 6] = concept.target_input
    for gate, lock in (("recommended (local lock)", "local"), ("recommended (global lock)", "global")):
        recommended = projections(comfy, apply(comfy, model, clip, concept, 0.9, 0.3, gate=gate)[0], context)
        widgets = projections(comfy, apply(comfy, model, clip, concept, *concept.recommended(lock))[0], context)
        assert all(torch.equal(recommended[l][p], widgets[l][p]) for l in widgets for p in (0, 1)), gate
    own = projections(comfy, apply(comfy, model, clip, concept, 0.9, 0.3, gate="beta and tau widgets")[0], context)
    assert all(torch.equal(own[l][p], unset[l][p]) for unset in [projections(
        comfy, apply(comfy, model, clip, concept, 0.9, 0.3)[0], context)] for l in own for p in (0, 1))
    assert any(not torch.equal(own[l][1], widgets[l][1]) for l in own)  # β 0.9 is not the recommendation
    with pytest.raises(ValueError, match="unknown gate 'auto': choose one of recommended"):
        apply(comfy, model, clip, concept, gate="auto")


def test_every_value_the_gate_widgets_offer_is_one_apply_accepts(comfy, loaded, concept_files):
    """The widgets' ends come from the core's ranges (perfusion_ops/settings.py): τ's widget once offered 0, which
    the core refuses."""
    model, clip = loaded
    spec = comfy.node("PerfusionApply").INPUT_TYPES()
    inputs = {**spec["required"], **spec["optional"]}
    for end in ("min", "max"):
        beta, tau, strength = (inputs[name][1][end] for name in ("beta", "tau", "strength"))
        apply(comfy, model, clip, concept_files.concept("hugsy"), beta, tau, strength=strength)
    train = comfy.node("PerfusionTrainConcept").INPUT_TYPES()["required"]
    assert inputs["tau"][1]["min"] > 0 and train["train_tau"][1]["min"] > 0
    assert ((train["train_beta"][1]["min"], train["train_beta"][1]["max"])
            == (inputs["beta"][1]["min"], inputs["beta"][1]["max"]))


def test_strength_scales_the_edit_linearly(comfy, loaded, concept_files):
    model, clip = loaded
    concept = concept_files.concept("hugsy")
    context = torch.randn(1, 77, 768) * 0.5
    context[0, 6] = concept.target_input  # gate open here
    plain = projections(comfy, model, context)
    got = {s: projections(comfy, apply(comfy, model, clip, concept, strength=s)[0], context) for s in (0.0, 0.5, 1.0)}
    moved = 0.0
    for layer, (k0, v0) in plain.items():
        (k_off, v_off), (k_half, v_half), (k_full, v_full) = (got[s][layer] for s in (0.0, 0.5, 1.0))
        assert torch.allclose(k_off, k0, atol=1e-5) and torch.allclose(v_off, v0, atol=1e-5), layer
        assert (torch.allclose(v_half, (v0 + v_full) / 2, atol=1e-5)
                and torch.allclose(k_half, (k0 + k_full) / 2, atol=1e-5))
        moved = max(moved, float((v_full - v0).abs().max()))
    assert moved > 1e-2, moved  # the full-strength edit really changed the output
    with pytest.raises(Exception, match="strength"):
        apply(comfy, model, clip, concept, strength=float("nan"))


@pytest.mark.parametrize("start_at, end_at", [(0.5, 1.0), (0.0, 0.4)])
def test_outside_start_at_end_at_the_model_is_the_plain_one(comfy, loaded, concept_files, start_at, end_at):
    """Sampling records each UNet call's σ and every to_k/to_v call of one layer: at the steps outside the range each
    output is the host projection of its input, bit for bit; inside it the edit acts (the prompt holds the trigger)."""
    model, clip = loaded
    concept = concept_files.concept("hugsy")
    patched, patched_clip = apply(comfy, model, clip, concept, 0.6, 0.15, start_at=start_at, end_at=end_at)
    with torch.inference_mode():
        cond = comfy.node("CLIPTextEncode")().encode(patched_clip, PROMPT.format("hugsy"))[0]
        negative = comfy.node("CLIPTextEncode")().encode(patched_clip, "blurry")[0]
        latent_in = comfy.node("EmptyLatentImage")().generate(64, 64, 1)[0]
    comfy.model_management.load_models_gpu([patched])
    sampling = comfy.adapter.patching.model_sampling(patched)
    unet = patched.model.diffusion_model
    attention = unet.get_submodule(next(iter(concept.value_outputs)))
    calls = []  # per UNet call: [σ, (edited, host) per projection call]

    def unet_call(module, args, kwargs):
        timestep = args[1] if len(args) > 1 else kwargs["timesteps"]
        calls.append([float(sampling.sigma(timestep.flatten()[:1]))])

    hooks = [unet.register_forward_pre_hook(unet_call, with_kwargs=True)]
    hooks += [m.register_forward_hook(lambda mod, args, out: calls[-1].append((out.clone(),
                                                                               type(mod).forward(mod, args[0]))))
              for m in (attention.to_k, attention.to_v)]
    sample_hooked(comfy, patched, hooks, 6, cond, negative, latent_in)
    high, low = sampling.percent_to_sigma(start_at), sampling.percent_to_sigma(end_at)
    # The UNet sees σ rounded to the model's timestep grid: judge only steps clearly away from a boundary.
    clear = [(sigma, low <= sigma <= high, outputs) for sigma, *outputs in calls
             if min(abs(sigma - low), abs(sigma - high)) > 0.05 * sigma]
    assert len(calls) == 6 and {act for _, act, _ in clear} == {True, False}, (calls, high, low)
    for sigma, act, outputs in clear:
        assert len(outputs) == 2  # one batched (cond, uncond) call of each projection
        for edited, host in outputs:
            assert torch.equal(edited, host) != act, (sigma, act)


def test_lora_and_perfusion_compose(comfy, loaded, small_lora, concept_files):
    model, clip = loaded
    concept = concept_files.concept("hugsy")
    with torch.inference_mode():
        lora_model = comfy.node("LoraLoader")().load_lora(model, clip, small_lora.name, 1.0, 1.0)[0]
    context = torch.randn(1, 77, 768) * 0.5
    context[0, 4] = concept.target_input
    comfy.model_management.load_models_gpu([lora_model])
    lora_weights = {n: (m.to_k.weight.clone(), m.to_v.weight.clone())
                    for n, m in lora_model.model.diffusion_model.named_modules() if n.endswith("attn2")}
    comfy.model_management.load_models_gpu([model])
    plain_weights = {n: m.to_k.weight.clone()
                     for n, m in model.model.diffusion_model.named_modules() if n.endswith("attn2")}
    assert any(not torch.equal(lora_weights[n][0], plain_weights[n]) for n in plain_weights), "LoRA did not patch"
    joint = JointEdit([AppliedConcept(concept, 0.7, 0.15)])
    lora_then_edit = apply(comfy, lora_model, clip, concept)[0]
    with torch.inference_mode():
        edit_then_lora = comfy.node("LoraLoader")().load_lora(apply(comfy, model, clip, concept)[0], clip,
                                                              small_lora.name, 1.0, 1.0)[0]
    for patched in (lora_then_edit, edit_then_lora):
        got = projections(comfy, patched, context)
        for layer, (wk, wv) in lora_weights.items():
            with torch.inference_mode():
                want_k = joint.projection(layer, "k", lambda x: x @ wk.T)(context)
                want_v = joint.projection(layer, "v", lambda x: x @ wv.T)(context)
            assert (torch.allclose(got[layer][0], want_k, atol=1e-4)
                    and torch.allclose(got[layer][1], want_v, atol=1e-4))


def another_packs_wrapper(apply_model, args):
    """A pass-through unet function wrapper, as other packs install one (it takes the single slot)."""
    return apply_model(args["input"], args["timestep"], **args["c"])


@pytest.mark.parametrize("foreign", [False, True], ids=["alone", "beside-another-wrapper"])
def test_global_key_lock_feeds_k_the_superclass_prompt(comfy, loaded, concept_files, foreign):
    if foreign and comfy.adapter.model_call.WrappersMP is None:
        pytest.skip("the 2024 tree has one unet function wrapper slot: "
                    "a wrapper set after Apply replaces the key lock's")
    model, clip = loaded
    concept = concept_files.concept("hugsy")
    patched, patched_clip = apply(comfy, model, clip, concept, 0.5, 0.15)
    if foreign:
        patched = patched.clone()
        patched.set_model_unet_function_wrapper(another_packs_wrapper)
    with torch.inference_mode():
        cond = comfy.node("PerfusionGlobalKeyLock")().encode(patched_clip, PROMPT.format("hugsy"))[0]
        real = patched_clip.encode_from_tokens(patched_clip.tokenize(PROMPT.format("hugsy")))
        superclass = patched_clip.encode_from_tokens(patched_clip.tokenize(PROMPT.format(concept.superclass)))
        negative = comfy.node("CLIPTextEncode")().encode(patched_clip, "blurry")[0]
        latent_in = comfy.node("EmptyLatentImage")().generate(64, 64, 1)[0]
    assert torch.equal(cond[0][0], real) and not torch.equal(real, superclass)
    comfy.model_management.load_models_gpu([patched])
    attention = patched.model.diffusion_model.get_submodule(next(iter(concept.value_outputs)))
    seen = []
    hooks = [m.register_forward_pre_hook(lambda mod, args, path=path: seen.append((path, args[0].clone())))
             for path, m in (("k", attention.to_k), ("v", attention.to_v))]
    sample_hooked(comfy, patched, hooks, 1, cond, negative, latent_in)
    pairs = list(zip(seen[0::2], seen[1::2]))
    locked = [(k, v) for (_, k), (_, v) in pairs if torch.allclose(v[0], real[0].to(v))]
    assert locked, "no cross-attention call saw the real prompt as V"
    for k, v in locked:
        assert torch.allclose(k[0], superclass[0].to(k)), "K did not see the superclass prompt"


def test_export_embedding_is_found_by_comfyui(comfy, concept_files):
    concept = concept_files.concept("hugsy")
    with torch.inference_mode():
        comfy.node("PerfusionExportEmbedding")().export(concept, "hugsy-ti")
    path = comfy.layout.folder("embeddings") / "hugsy-ti.safetensors"
    assert torch.equal(load_file(path)["emb_params"], concept.embedding.float())
    with pytest.raises(ValueError, match="plain file name"):
        comfy.node("PerfusionExportEmbedding")().export(concept, "../escape")


@pytest.mark.parametrize("case", ["width", "corrupt", "missing", "tau0"])
def test_bad_input_is_a_node_error_and_the_server_keeps_serving(server, case, concept_files_server):
    ckpt = "sd15-small-random.safetensors"
    concepts = {"width": [("sd2-concept.safetensors", 0.7, 0.15)], "corrupt": [("corrupt.safetensors", 0.7, 0.15)],
                "missing": [("nope.safetensors", 0.7, 0.15)], "tau0": [("hugsy.safetensors", 0.7, 0.0)]}[case]
    expected = {"width": "SD2.x", "corrupt": "truncated or not a safetensors", "missing": "nope.safetensors",
                "tau0": "smaller than min of 0.001"}[case]  # τ = 0: ComfyUI's own validation, from τ's range
    with pytest.raises(Exception) as failure:
        server.run(sampling_graph(ckpt, PROMPT.format("hugsy"), concepts, steps=1))
    assert expected in str(failure.value), str(failure.value)[:2000]
    history = server.run(sampling_graph(ckpt, PROMPT.format("cat"), steps=1))  # the next prompt still runs
    assert history["status"]["status_str"] == "success"
