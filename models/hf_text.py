"""Text towers from ``transformers``: captions tokenised in the data loader (``input_ids``, ``attention_mask``
``(B, L)``) -> a pretrained encoder -> one vector per caption ``(B, D)``.

A frozen tower's vectors are computed once per dataset (``preprocessing/tower_stores.py``) and come in as
``text_embeds`` ``(B, D)``, like Sentence-BERT's; its backbone is then not even loaded, and it is never
part of the state dict (it is the model id's).
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import torch
from pydantic import PositiveInt
from torch import nn

from models.hf_audio import PretrainedTower, PretrainedTowerConfig
from models.pooling import masked_mean
from models.pretrained import load_pretrained
from models.text_encoders import TEXT_ENCODERS


class PretrainedTextConfig(PretrainedTowerConfig):
    max_length: PositiveInt = 77  # tokens per caption (CLAP: 77); longer captions are truncated


class PretrainedTextTower(PretrainedTower):
    """The shared body of the ``transformers`` text towers; subclasses load the backbone and pool."""

    Config: ClassVar[type[PretrainedTextConfig]]
    key: ClassVar[str] = "model.text_enc.model_id"

    def __init__(
        self, config: PretrainedTextConfig | None = None, *, in_dim: int | None = None, load_backbone: bool = True
    ) -> None:
        super().__init__(config, in_dim, load_backbone)
        self.out_dim = self.width

    def pool(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The backbone on tokens ``(B, L)`` -> ``(B, D)``."""
        raise NotImplementedError

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        text_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Tokens, or a frozen tower's cached ``text_embeds`` ``(B, D)`` (passed through) -> ``(B, D)``."""
        if text_embeds is not None:
            return text_embeds
        if self.backbone is None:
            raise RuntimeError(f"{type(self).__name__} was built without its backbone: pass cached text_embeds")
        return self.pool(input_ids, attention_mask)


@TEXT_ENCODERS.register
class AutoTextEncoder(PretrainedTextTower):
    """Any ``AutoModel`` text encoder (RoBERTa, BERT, MPNet, NomicBERT, ...) with masked-mean pooling over
    the caption's tokens, or the first token's state (``cls``)."""

    class Config(PretrainedTextConfig):
        name: Literal["AutoTextEncoder"] = "AutoTextEncoder"
        model_id: str = "FacebookAI/roberta-base"
        pooling: Literal["mean", "cls"] = "mean"

    def __init__(self, config: Config | None = None, **inputs: Any) -> None:
        super().__init__(config, **inputs)

    @classmethod
    def load_backbone(cls, config: Config) -> nn.Module:
        from transformers import AutoModel

        return load_pretrained(
            AutoModel.from_pretrained, config.model_id, cls.key, trust_remote_code=config.trust_remote_code
        )

    def pool(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # (B, L, D)
        if self.config.pooling == "cls":
            return hidden[:, 0]
        return masked_mean(hidden, attention_mask.sum(-1))  # tokens are left-aligned: the mask is a prefix


@TEXT_ENCODERS.register
class ClapTextEncoder(PretrainedTextTower):
    """LAION CLAP's RoBERTa text model (``ClapTextModelWithProjection``'s ``text_model``; its projection is the
    model's head, see ``DualEncoderModel.Config.init_from``), pooled as CLAP does: ``pooler_output``."""

    class Config(PretrainedTextConfig):
        name: Literal["ClapTextEncoder"] = "ClapTextEncoder"
        model_id: str = "laion/clap-htsat-unfused"

    def __init__(self, config: Config | None = None, **inputs: Any) -> None:
        super().__init__(config, **inputs)

    @classmethod
    def load_backbone(cls, config: Config) -> nn.Module:
        from transformers import ClapTextModelWithProjection

        model = load_pretrained(
            ClapTextModelWithProjection.from_pretrained,
            config.model_id,
            cls.key,
            trust_remote_code=config.trust_remote_code,
        )
        return model.text_model

    def pool(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.backbone(input_ids=input_ids, attention_mask=attention_mask).pooler_output
