"""The webui side: the ``perfusion`` extra network, the trigger embeddings, the A1111 hooks, the Forge patches,
settings and infotext. The only module of the pack that imports the webui (``modules.*``); it is imported by
``scripts/perfusion_webui.py`` inside a running AUTOMATIC1111 webui or Forge.

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

import contextlib
import os
from pathlib import Path

from modules import extra_networks, script_callbacks, scripts, shared

from perfusion_ops.concept import ConceptError
from perfusion_ops.modules import cross_attention_layers, text_width
from .prompt_tags import NETWORK, TagError, parse_infotext, restore_prompt, tag_from_items

from .activation import Activation, activate
from .forge_patches import install as install_forge
from .hooks import HookedEdit
from .keylock import KeyContexts
from .library import ConceptLibrary
from .monitor import GateMonitor

OPTION_DIR = "perfusion_dir"
FOLDER = "perfusion"
LOG = "[Perfusion]"


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
    folders = concept_folders()
    global _LIBRARY
    if _LIBRARY is None or _LIBRARY.folders != folders:
        _LIBRARY = ConceptLibrary(folders)
    return _LIBRARY


_LIBRARY: ConceptLibrary | None = None


def is_forge(sd_model) -> bool:
    return hasattr(sd_model, "forge_objects")


ROUTE_VARIABLE = "PERFUSION_WEBUI_ROUTE"


def use_hooks(sd_model) -> bool:
    """A1111: forward hooks; Forge: UnetPatcher patches. ``PERFUSION_WEBUI_ROUTE=hooks`` forces the hook route
    in Forge too (a diagnostic: Forge's modules are called like the webui's, so both routes can be compared
    in one real host); ``=patches`` has no effect outside Forge."""
    route = os.environ.get(ROUTE_VARIABLE, "auto").strip().lower()
    return route == "hooks" or not is_forge(sd_model)


def diffusion_model(sd_model):
    if is_forge(sd_model):
        return sd_model.forge_objects.unet.model.diffusion_model
    return sd_model.model.diffusion_model


def cross_attention_widths(unet) -> tuple[dict[str, int], int]:
    """The edited layers' widths and the text width of ``unet``."""
    widths = cross_attention_layers(unet)
    if not widths:
        raise ConceptError("this model has no cross-attention layers to edit")
    return widths, text_width(unet, widths)


def forge_attention():
    try:
        from backend.attention import attention_function  # Forge (2024-08 and later)
    except ImportError:
        from ldm_patched.ldm.modules.attention import optimized_attention as attention_function  # Forge 1
    return attention_function


# ------------------------------------------------------------------------------------------- embeddings
class Embeddings:
    """The learned trigger vectors, registered in the host's embedding database for one generation."""

    def __init__(self):
        self.registered: dict[str, object] = {}  # name -> the embedding it shadowed (or None)
        self.db = None

    @staticmethod
    def _database(sd_model):
        engine = getattr(sd_model, "text_processing_engine", None)
        if engine is not None:  # Forge
            from backend.text_processing.textual_inversion import Embedding
            return engine.embeddings, Embedding, lambda db, e, name: db.register_embedding_by_name(e, name)
        from modules import sd_hijack
        from modules.textual_inversion.textual_inversion import Embedding
        return (sd_hijack.model_hijack.embedding_db, Embedding,
                lambda db, e, name: db.register_embedding_by_name(e, shared.sd_model, name))

    def register(self, sd_model, triggers: dict) -> None:
        self.remove()
        db, embedding_class, register = self._database(sd_model)
        self.db, self._register = db, register
        for word, concept in triggers.items():
            vec = concept.embedding.detach().float().cpu()
            embedding = embedding_class(vec, word)
            embedding.vectors, embedding.shape = vec.shape[0], vec.shape[-1]
            self.registered[word] = db.word_embeddings.get(word)
            register(db, embedding, word)

    def remove(self) -> None:
        if self.db is None:
            return
        for word, previous in self.registered.items():
            self._register(self.db, None, word)
            if previous is not None:
                self._register(self.db, previous, word)
        self.registered, self.db = {}, None


# ------------------------------------------------------------------------------------------------ state
class Generation:
    """What is active for the current generation (module-level: the webui runs one generation at a time)."""

    def __init__(self):
        self.activation: Activation | None = None
        self.hooks: HookedEdit | None = None
        self.keys: KeyContexts | None = None
        self.embeddings = Embeddings()
        self.forge_edits: list = []
        self.monitors: list[GateMonitor] = []

    def edit(self):
        """A fresh joint edit of the active concepts, watched by a :class:`GateMonitor`."""
        edit = self.activation.edit()
        self.monitors.append(GateMonitor(edit))
        return edit

    @property
    def calls(self) -> int:
        hooks = self.hooks.calls if self.hooks is not None else 0
        return hooks + sum(e.calls for e in self.forge_edits)

    def clear(self) -> None:
        if self.activation is not None and self.monitors:
            print(f"{LOG} edit applied in {self.calls} cross-attention layer calls; "
                  + "; ".join(m.report(self.activation.names) for m in self.monitors if m.contexts)
                  + ("" if any(m.contexts for m in self.monitors) else "no text context reached it")
                  + ("" if self.keys is None else f"; global key lock: K context replaced in "
                     f"{self.keys.matched_rows} batch rows"))
        if self.hooks is not None:
            self.hooks.remove()
        self.hooks = None
        self.embeddings.remove()
        self.activation, self.keys = None, None
        self.forge_edits, self.monitors = [], []


STATE = Generation()


def _crossattn(cond):
    return cond["crossattn"] if isinstance(cond, dict) else cond


def key_contexts(p, act: Activation) -> KeyContexts | None:
    """Encode every prompt of the batch and its key-lock version (triggers → superclass), the way the webui
    splits it (AND, [from:to:when] schedules), and pair the encodings for :class:`KeyContexts`."""
    if not act.global_lock:
        return None
    from modules import prompt_parser

    keys = KeyContexts()
    texts = []
    steps = max(int(getattr(p, "steps", 1) or 1), 1)
    for prompt in dict.fromkeys(p.prompts):
        _, subprompts, _ = prompt_parser.get_multicond_prompt_list([prompt])
        for sub in subprompts:
            for _, text in prompt_parser.get_learned_conditioning_prompt_schedules([sub], steps)[0]:
                key = act.key_prompt(text)
                if key != text:
                    texts.append((text, key))
    texts = list(dict.fromkeys(texts))
    if not texts:
        print(f"{LOG} global key lock: no trigger word in the prompt, nothing to lock")
        return None
    try:  # encode as setup_conds does (A1111 runs it under autocast); each text alone, so no batch padding
        from modules import devices
        autocast = devices.autocast
    except (ImportError, AttributeError):
        autocast = contextlib.nullcontext
    with autocast():
        for text, key in texts:
            real, locked = (_crossattn(p.sd_model.get_learned_conditioning([t]))[0] for t in (text, key))
            if real.shape == locked.shape:
                keys.add(real, locked)
            else:
                print(f"{LOG} global key lock: '{key}' encodes to another length than '{text}'; local lock there")
    return keys


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
            STATE.keys = key_contexts(p, act)
            if use_hooks(p.sd_model):
                STATE.hooks = HookedEdit(unet, STATE.edit(), STATE.keys)
            p.extra_generation_params.update(act.infotext())
            settings = (f"{n} (trigger {c.trigger}, β {a.beta:g}, τ {a.tau:g}, strength {t.strength:g})"
                        for n, c, a, t in zip(act.names, act.concepts, act.applied, act.tags))
            route = "forward hooks" if STATE.hooks is not None else "UnetPatcher attn2 patches"
            print(f"{LOG} {', '.join(settings)}" + (" with global key lock" if STATE.keys else "") + f", via {route}")
            for trigger in act.triggers_in(list(getattr(p, "negative_prompts", None) or [])):
                print(f"{LOG} '{trigger}' is in the negative prompt: the concept applies there too and steers the "
                      "image away from it (remove the word from the negative prompt if that is not meant)")
        except (TagError, ConceptError, ValueError) as err:
            # A refused tag is the user's input, not a fault: one line with the reason (A1111 would print a whole
            # traceback for a raise) and the infotext; the generation runs without the edit.
            STATE.clear()
            message = str(err)
            p.extra_generation_params["Perfusion error"] = message.replace(",", ";")
            p.comment(f"Perfusion: {message}")
            print(f"{LOG} {message}; generating without Perfusion")

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
        print(f"{LOG} could not restore the pasted Perfusion tags: {err}")


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
    script_callbacks.on_before_ui(register_network)
    script_callbacks.on_ui_settings(on_ui_settings)
    script_callbacks.on_infotext_pasted(on_infotext_pasted)
    os.makedirs(concept_folders()[0], exist_ok=True)
