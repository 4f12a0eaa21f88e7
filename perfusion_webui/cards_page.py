"""The Perfusion tab of the webui's Extra Networks (AUTOMATIC1111 and Forge): a card per concept file, and the user
metadata editor with the preferences a click inserts (``cards.py`` says what they are).

Imports the webui's page classes (``modules.ui_extra_networks``, gradio), so ``host.py`` imports this module only in
its ``on_before_ui`` callback. Preview images are the webui's usual ones: ``<name>.png`` (or ``.preview.png``, any
preview extension) beside the concept file; the editor's "Replace preview" writes one from the gallery.
"""
from __future__ import annotations

import html
import os

import gradio as gr
from modules import shared, ui_extra_networks
from modules.ui_extra_networks_user_metadata import UserMetadataEditor

from perfusion_ops.concept import ConceptError
from perfusion_ops.settings import BETA, STRENGTH

from . import cards


class ConceptCards(ui_extra_networks.ExtraNetworksPage):
    """One card per file the library finds, in ``models/perfusion`` and the extra folder of the settings."""

    def __init__(self, library, folders):
        super().__init__("Perfusion")
        # host.library / host.concept_folders, called at each listing: new files, and a changed extra-folder
        # setting, show on the tab's refresh without a refresh() of our own (the library walks the folders)
        self.library, self.folders = library, folders

    def allowed_directories_for_previews(self):
        return [str(folder) for folder in self.folders()]

    def create_item(self, name, index=None, enable_filter=True):
        path = self.library().files().get(name)
        return None if path is None else self._card(name, path, index)

    def list_items(self):
        for index, (name, path) in enumerate(list(self.library().files().items())):  # one walk of the folders
            yield self._card(name, path, index)

    def _card(self, name, path, index):
        try:
            return self._item(name, path, index)
        except Exception as err:  # noqa: BLE001 (A1111 builds every tab in one go: one odd file must not stop them)
            stem = os.path.splitext(str(path))[0]
            return {"name": name, "filename": str(path), "preview": None, "search_terms": [], "metadata": {},
                    "description": self._shown(f"cannot be used: {err}"), "sort_keys": {"default": index},
                    "local_preview": f"{stem}.{shared.opts.samples_format}", "user_metadata": {},
                    "prompt": ui_extra_networks.quote_js(f"<perfusion:{name}>")}

    def _item(self, name, path, index):
        library = self.library()
        try:
            concept, error = library.load(path), None
        except (ConceptError, OSError) as err:  # the card says why (the webui lists the pages at every refresh)
            concept, error = None, str(err)
        stem = os.path.splitext(str(path))[0]
        short_hash = library.short_hash(path) if concept is not None else ""  # not a concept: no need to read it all
        generated = cards.description(concept, path.stat().st_size, error)
        description = self.find_description(stem) or self._shown(generated)
        item = {
            "name": name,
            "filename": str(path),
            "shorthash": short_hash,
            "preview": self.find_preview(stem),
            "description": description,
            # A1111 writes search terms into the page as they are: a file's words must not become markup
            "search_terms": [self.search_terms_from_path(str(path))]
            + [html.escape(term) for term in cards.search_terms(concept, short_hash)],
            "local_preview": f"{stem}.{shared.opts.samples_format}",
            "metadata": cards.details(concept) if concept else {},
            "sort_keys": {"default": index, **self.get_sort_keys(str(path))},
        }
        self.read_user_metadata(item)
        trigger = concept.trigger if concept else ""
        item["prompt"] = ui_extra_networks.quote_js(cards.inserted_text(name, trigger, item["user_metadata"]))
        return item

    @staticmethod
    def _shown(text: str) -> str:
        """Our plain-text description as the card will show it: escaped where the webui is set to show HTML."""
        return html.escape(text) if getattr(shared.opts, "extra_networks_card_description_is_html", False) else text

    def create_user_metadata_editor(self, ui, tabname):
        return PreferencesEditor(ui, tabname, self)


class PreferencesEditor(UserMetadataEditor):
    """The webui's metadata editor (description, notes, preview) plus what a click on the card inserts."""

    def save_user_metadata(self, name, desc, notes, activation_text, strength, beta):
        beta = str(beta or "").strip()
        if beta and cards.preference({"b": beta}, "b", BETA) is None:
            raise gr.Error(f"preferred β must be a number in {BETA} (or empty for the concept's recommended β)")
        user_metadata = self.get_user_metadata(name)
        user_metadata.update({"description": desc, "notes": notes, cards.ACTIVATION: activation_text,
                              cards.STRENGTH_KEY: float(strength), cards.BETA_KEY: beta})
        self.write_user_metadata(name, user_metadata)

    def put_values_into_components(self, name):
        user_metadata = self.get_user_metadata(name)
        strength = cards.preference(user_metadata, cards.STRENGTH_KEY, STRENGTH)
        return [*super().put_values_into_components(name), user_metadata.get(cards.ACTIVATION, ""),
                1.0 if strength is None else strength, user_metadata.get(cards.BETA_KEY, "")]

    def create_editor(self):
        self.create_default_editor_elems()
        activation = gr.Textbox(label="Activation text (empty: the trigger word)", lines=1)
        strength = gr.Slider(label="Preferred strength", minimum=STRENGTH.low, maximum=STRENGTH.high,
                             step=STRENGTH.step, value=1.0)
        beta = gr.Textbox(label=f"Preferred β, in {BETA} (empty: the concept's recommended β)", lines=1)
        self.edit_notes = gr.TextArea(label="Notes", lines=4)
        self.create_default_buttons()
        outputs = [self.edit_name, self.edit_description, self.html_filedata, self.html_preview, self.edit_notes,
                   activation, strength, beta]
        shown = self.button_edit.click(fn=self.put_values_into_components, inputs=[self.edit_name_input],
                                       outputs=outputs)
        shown.then(fn=lambda: gr.update(visible=True), inputs=[], outputs=[self.box])
        self.setup_save_handler(self.button_save, self.save_user_metadata,
                                [self.edit_description, self.edit_notes, activation, strength, beta])


def register(library, folders) -> None:
    """Add the tab (``on_before_ui``: the webui builds its pages after the callbacks ran)."""
    if not any(isinstance(page, ConceptCards) for page in ui_extra_networks.extra_pages):
        ui_extra_networks.register_page(ConceptCards(library, folders))
