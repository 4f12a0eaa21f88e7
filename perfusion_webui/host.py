"""The webui's callbacks: the ``perfusion`` extra network and its Extra Networks tab, the always-on script,
settings and pasted infotext, and the one registry of this process (``STATE``, the current generation). The only
module of the pack that imports the webui (``modules.*``) when it is imported: ``cards_page`` is imported only when
the webui builds its UI, and ``embeddings``, ``generation`` and ``routes`` reach the webui inside their functions.
``scripts/perfusion_webui.py`` imports it inside a running AUTOMATIC1111 webui or Forge.

Life of one generation (both hosts)::

    Script.process            drop anything left over from a generation that failed half-way
    ExtraNetwork.activate     parse <perfusion:...> (the webui removed them from the prompt), load the concepts,
                              register each trigger word's learned embedding, encode key-lock prompts,
                              A1111: hook the edit into to_k/to_v; write the infotext
    Script.process_before_every_sampling
                              Forge: clone the UnetPatcher and put the edit's attn2 patches on the clone
    (sampling)
    ExtraNetwork.deactivate   A1111: remove the hooks; unregister the embeddings (restoring any TI of that name)
    Script.postprocess        the same, again (idempotent)
"""
from __future__ import annotations

import functools
import os
from pathlib import Path

from modules import extra_networks, script_callbacks, scripts, shared

from perfusion_ops.concept import ConceptError

from .activation import activate
from .console import log
from .forge_patches import install as install_forge
from .generation import Generation, key_contexts
from .hooks import HookedEdit
from .library import ConceptLibrary
from .prompt_tags import NETWORK, TagError, parse_infotext, restore_prompt, tag_from_items
from .routes import cross_attention_widths, diffusion_model, forge_attention, use_hooks

OPTION_DIR = "perfusion_dir"
FOLDER = "perfusion"
STATE = Generation()  # the one registry: the webui runs one generation at a time


def concept_folders() -> list[Path]:
    """``models/perfusion`` (created if missing) and the folder of the settings option, if any."""
    try:
        from modules import paths
        models = Path(paths.models_path)
    except Exception:  # very old trees
        models = Path(shared.cmd_opts.ckpt_dir or "models").parent
    default = models / FOLDER
    default.mkdir(parents=True, exist_ok=True)
    extra = str(getattr(shared.opts, OPTION_DIR, "") or "").strip()
    return [default] + ([Path(extra).expanduser()] if extra else [])


def library() -> ConceptLibrary:
    """The concept files of the current folders; one library (and its hash cache) while the folders stay."""
    return _library(tuple(concept_folders()))


@functools.lru_cache(maxsize=1)
def _library(folders: tuple[Path, ...]) -> ConceptLibrary:
    return ConceptLibrary(list(folders))


class ExtraNetworkPerfusion(extra_networks.ExtraNetwork):
    def __init__(self):
        super().__init__(NETWORK)

    def activate(self, p, params_list):
        STATE.clear()  # each call overrides the previous one completely (webui contract)
        if not params_list:
            return
        try:
            tags = [tag_from_items(params.items) for params in params_list]
            unet = diffusion_model(p.sd_model)
            widths, text_width = cross_attention_widths(unet)
            clip_skip = int(getattr(shared.opts, "CLIP_stop_at_last_layers", 1) or 1)
            act = activate(tags, library(), widths, text_width, clip_layer=-clip_skip)
            STATE.activation = act
            STATE.embeddings.register(p.sd_model, act.triggers())
            STATE.keys = key_contexts(p, act, clip_skip)
            if use_hooks(p.sd_model):
                STATE.hooks = HookedEdit(unet, STATE.edit(), STATE.keys)
            p.extra_generation_params.update(act.infotext())
            settings = (f"{n} (trigger {c.trigger}, β {a.beta:g}, τ {a.tau:g}, strength {t.strength:g})"
                        for n, c, a, t in zip(act.names, act.concepts, act.applied, act.tags))
            route = "forward hooks" if STATE.hooks is not None else "UnetPatcher attn2 patches"
            log.info(f"{', '.join(settings)}" + (" with global key lock" if STATE.keys else "") + f", via {route}")
            for trigger in act.triggers_in(list(getattr(p, "negative_prompts", None) or [])):
                log.info(f"'{trigger}' is in the negative prompt: the concept applies there too and steers the "
                         "image away from it (remove the word from the negative prompt if that is not meant)")
        except (TagError, ConceptError, ValueError) as err:
            # A refused tag is the user's input, not a fault: one line with the reason (A1111 would print a whole
            # traceback for a raise) and the infotext; the generation runs without the edit.
            STATE.clear()
            message = str(err)
            p.extra_generation_params["Perfusion error"] = message.replace(",", ";")
            p.comment(f"Perfusion: {message}")
            log.info(f"{message}; generating without Perfusion")

    def deactivate(self, p):
        STATE.clear()


def install_forge_edit(p) -> None:
    """Forge: the edit's attn2 patches on a clone of the current UnetPatcher (called before every sampling)."""
    act = STATE.activation
    if act is None or use_hooks(p.sd_model):
        return
    unet = p.sd_model.forge_objects.unet.clone()
    STATE.forge_edits.append(install_forge(unet, STATE.edit(), forge_attention(), STATE.keys))
    p.sd_model.forge_objects.unet = unet


def register_network() -> None:
    if NETWORK not in extra_networks.extra_network_registry:
        extra_networks.register_extra_network(ExtraNetworkPerfusion())


def before_ui() -> None:
    """The extra network, and the Perfusion tab of Extra Networks (its module imports gradio and the webui's page
    classes, so only here, when the webui builds its pages)."""
    register_network()
    from .cards_page import register
    register(library, concept_folders)


def on_ui_settings() -> None:
    section = ("perfusion", "Perfusion")
    shared.opts.add_option(OPTION_DIR, shared.OptionInfo(
        "", "Extra folder with Perfusion concept files (besides models/perfusion)", section=section))


def on_infotext_pasted(infotext, params) -> None:
    """Pasted parameters: concepts found by hash under another name are renamed, missing tags re-added."""
    if "Perfusion" not in params and "Perfusion hashes" not in params:
        return
    try:
        tags, hashes = parse_infotext(params)
        lib, rename = library(), {}
        names = set(lib.files())
        for name, digest in hashes.items():
            if name not in names:
                found = lib.find_by_hash(digest)
                if found is not None and found != name:
                    rename[name] = found
        if "Prompt" in params:
            params["Prompt"] = restore_prompt(params["Prompt"], params, rename)
    except (TagError, ConceptError, OSError) as err:
        log.info(f"could not restore the pasted Perfusion tags: {err}")


class PerfusionScript(scripts.Script):
    """Always-on script: cleanup around each generation, and Forge's per-sampling patches."""

    def title(self):
        return "Perfusion"

    def show(self, is_img2img):
        return scripts.AlwaysVisible

    def ui(self, is_img2img):
        return []

    def process(self, p, *args):
        register_network()
        STATE.clear()

    def process_before_every_sampling(self, p, *args, **kwargs):
        install_forge_edit(p)

    def postprocess(self, p, processed, *args):
        STATE.clear()


def setup() -> None:
    """Called once when the webui imports the entry script."""
    script_callbacks.on_before_ui(before_ui)
    script_callbacks.on_ui_settings(on_ui_settings)
    script_callbacks.on_infotext_pasted(on_infotext_pasted)
    os.makedirs(concept_folders()[0], exist_ok=True)
