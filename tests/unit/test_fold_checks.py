"""What a fold plan learns from the base alone: tie groups (from transformers' own tie information), the shapes of
tied weights the checkpoint leaves out, and which adapted weights are Conv2d kernels larger than 1x1."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

from oftmerge.formats.shards import tie_groups, tied_embeddings, tied_shapes
from oftmerge.plan.fold import _is_spatial_conv

from helpers import save_llama

BART = dict(d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=32,
            decoder_ffn_dim=32, vocab_size=40, max_position_embeddings=32)  # fmt: skip
T5 = dict(d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2, vocab_size=40, decoder_start_token_id=0, pad_token_id=0)


def _save(tmp_path, config: str, model: str, **kw):
    import transformers

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        getattr(transformers, model)(getattr(transformers, config)(**kw)).save_pretrained(tmp_path / model)
    return tmp_path / model


def test_bart_and_t5_tie_four_names_to_shared(tmp_path):
    bart = _save(tmp_path, "BartConfig", "BartForConditionalGeneration", **BART)
    group = ("model.shared.weight", "lm_head.weight", "model.decoder.embed_tokens.weight", "model.encoder.embed_tokens.weight")
    assert tie_groups(bart) == (group,)
    assert tied_embeddings(bart) is None  # not a pair: the fold does not untie it (it refuses to rotate it)
    shapes = tied_shapes(bart)  # the checkpoint stores model.shared.weight only; the loaded model has all four
    assert all(shapes[name] == (40, 16) for name in group)
    t5 = _save(tmp_path, "T5Config", "T5ForConditionalGeneration", **T5)
    assert tie_groups(t5) == (("shared.weight", "decoder.embed_tokens.weight", "encoder.embed_tokens.weight", "lm_head.weight"),)


def test_a_llama_ties_a_pair_or_nothing(tmp_path):
    tied = save_llama(tmp_path / "tied", tie_word_embeddings=True)
    assert tie_groups(tied) == (("model.embed_tokens.weight", "lm_head.weight"),) and tied_embeddings(tied) == tie_groups(tied)[0]
    assert tied_shapes(tied)["lm_head.weight"] == (300, 64)
    assert tie_groups(save_llama(tmp_path / "untied")) == ()


def test_without_transformers_information_the_pair_is_guessed(tmp_path):
    base = save_llama(tmp_path / "b", tie_word_embeddings=True)
    config = json.loads((base / "config.json").read_text())
    (base / "config.json").write_text(json.dumps({**config, "architectures": ["NotATransformersModel"]}))
    assert tie_groups(base) == (("model.embed_tokens.weight", "lm_head.weight"),)  # tied_embeddings' pair


@pytest.mark.parametrize(
    "shape, spatial",
    [((4, 2, 3, 3), True), ((32, 3, 4, 4), True), ((6, 4, 1, 3), True), ((4, 2, 1, 1), False), ((16, 24), False), ((4, 2, 3), False)],
)
def test_conv2d_kernels_larger_than_1x1(shape, spatial):
    assert _is_spatial_conv(shape) == spatial
    if len(shape) == 4:
        assert _is_spatial_conv(tuple(torch.nn.Conv2d(shape[1], shape[0], shape[2:]).weight.shape)) == spatial
