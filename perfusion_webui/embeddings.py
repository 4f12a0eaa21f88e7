"""The learned trigger vectors in the webui's textual-inversion database, for one generation (A1111 and Forge
keep different databases; a registered word shadows a textual inversion of the same name until it is removed)."""
from __future__ import annotations

from perfusion_ops.concept import ConceptError


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
        try:
            from modules import sd_hijack, shared
            from modules.textual_inversion.textual_inversion import Embedding
        except ImportError as err:  # a Forge (Neo) engine without a text_processing_engine, e.g. not SD1.x
            raise ConceptError("this model has no textual-inversion database for the trigger words "
                               "(Perfusion concepts need an SD1.x checkpoint in the webuis)") from err
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
