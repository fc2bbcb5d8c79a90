"""The toy prior's world, tokenizer, evaluator and shipped weights."""

import math

import pytest
import torch

from csd.models import TOY_PRIOR, ModelConfig, load_prior
from csd.prompts import view_names, view_prompt
from csd.toy.evaluator import EVALUATOR_WEIGHTS, load_evaluator, parse_prompt
from csd.toy.model import SPECIAL_TOKENS, build_tokenizer
from csd.toy.world import COLOUR_NAMES, SHAPES, WorldConfig, render_layers, sample_batch, sample_scenes, vocabulary

UNSEEN_SEED = 3_000_000_007  # used by nothing that trains


def test_renders_are_deterministic_per_seed():
    first, again, other = sample_batch(8, seed=12), sample_batch(8, seed=12), sample_batch(8, seed=13)
    assert first.images.shape == (8, 3, 32, 32)
    assert 0 <= first.images.min() and first.images.max() <= 1
    assert torch.equal(first.images, again.images) and first.captions == again.captions
    assert not torch.allclose(first.images, other.images)


def test_layers_composite_to_the_render():
    from csd.cameras import sample_cameras
    from csd.toy.world import render

    config = WorldConfig()
    generator = torch.Generator().manual_seed(4)
    scenes = sample_scenes(6, config, generator)
    cameras = sample_cameras(6, config.cameras, generator)
    colour, alpha = render_layers(scenes, cameras, config)
    composite = colour + (1 - alpha) * scenes.background[:, :, None, None]
    assert torch.allclose(composite, render(scenes, cameras, config), atol=1e-5)
    assert 0.02 < alpha.mean() < 0.9  # an object, and a background around it


def test_caption_view_suffix_matches_the_prompt_processor():
    batch = sample_batch(48, WorldConfig(empty_caption_prob=0.0), seed=21)
    views = view_names(batch.cameras.elevation, batch.cameras.azimuth)
    assert len(set(views)) >= 3  # the cameras cover several views
    for i, text in enumerate(batch.captions):
        subject = f"a {COLOUR_NAMES[batch.scenes.colour[i]]} {SHAPES[batch.scenes.shape[i]]}"
        expected = view_prompt(subject, views[i])
        assert text == expected or text.startswith(expected + ", "), (text, expected)


def test_empty_captions_stay_empty():
    batch = sample_batch(64, WorldConfig(empty_caption_prob=0.5), seed=5)
    empty = [c for c in batch.captions if c == ""]
    assert 10 < len(empty) < 54
    assert all(c == "" or c.startswith("a ") for c in batch.captions)


def test_tokenizer_round_trip_and_unknown_words(tmp_path):
    from transformers import AutoTokenizer

    tokenizer = build_tokenizer()
    words = vocabulary()
    ids = [tokenizer.convert_tokens_to_ids(w) for w in words]
    assert len(set(ids)) == len(words)  # distinct words, distinct ids
    special = {tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    assert not special & set(ids)

    caption = "a red cube, front view, noisy, low quality"
    encoded = tokenizer(caption).input_ids
    assert encoded[0] == tokenizer.bos_token_id and encoded[-1] == tokenizer.eos_token_id
    assert tokenizer.convert_ids_to_tokens(encoded[1:-1]) == ["a", "red", "cube", ",", "front", "view", ",", "noisy", ",", "low", "quality"]
    assert tokenizer.unk_token_id not in encoded
    assert tokenizer("A RED Cube").input_ids == tokenizer("a red cube").input_ids

    unknown = tokenizer("a pink cube").input_ids
    assert unknown[2] == tokenizer.unk_token_id != tokenizer.eos_token_id
    assert unknown.count(tokenizer.eos_token_id) == 1

    tokenizer.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert loaded(caption).input_ids == encoded and loaded("a pink cube").input_ids == unknown


@pytest.mark.parametrize(
    "prompt, expected",
    [
        ("a red cube", ("red", "cube")),
        ("a red cube, front view", ("red", "cube")),
        ("A Purple Torus, overhead view, noisy, low quality", ("purple", "torus")),
        ("an orange cone on a table", ("orange", "cone")),
    ],
)
def test_prompt_parsing(prompt, expected):
    assert parse_prompt(prompt) == expected


@pytest.mark.parametrize(
    "prompt, message",
    [("a pink cube", "no known colour"), ("a red pyramid", "no known shape"), ("a red blue cube", "several"), ("", "colour")],
)
def test_prompt_parsing_rejects_unknown_words(prompt, message):
    with pytest.raises(ValueError, match=message):
        parse_prompt(prompt)


def test_evaluator_scores_fresh_renders():
    assert EVALUATOR_WEIGHTS.stat().st_size <= 5 * 2**20
    evaluator = load_evaluator()
    batch = sample_batch(64, seed=UNSEEN_SEED)
    prompts = [f"a {COLOUR_NAMES[c]} {SHAPES[s]}, side view" for c, s in zip(batch.scenes.colour, batch.scenes.shape)]
    result = evaluator.score(batch.images, prompts)
    assert result.colour_probs.shape == (64, len(COLOUR_NAMES)) and result.shape_probs.shape == (64, len(SHAPES) + 1)  # + other
    assert torch.allclose(result.colour_probs.sum(1), torch.ones(64), atol=1e-5)
    assert result.colour_fraction >= 0.95 and result.shape_fraction >= 0.95
    assert result.colour_correct.dtype == torch.bool and result.correct.shape == (64,)

    # any size is resized to 32²; a wrong prompt scores as wrong
    upsampled = torch.nn.functional.interpolate(batch.images, size=64, mode="nearest")
    assert evaluator.score(upsampled, prompts).fraction_correct >= 0.9
    red = batch.scenes.colour == COLOUR_NAMES.index("red")
    assert evaluator.score(batch.images[~red], "a red cube").colour_fraction <= 0.1
    with pytest.raises(ValueError, match="prompts for"):
        evaluator.score(batch.images, prompts[:3])


@pytest.mark.skipif(
    not (TOY_PRIOR / "model_index.json").exists(),
    reason=f"the toy prior is not exported yet ({TOY_PRIOR}/model_index.json missing; `python -m tools.toy.train`)",
)
def test_shipped_prior_loads_offline_and_guides(monkeypatch, tmp_path):
    from csd.cameras import orbit_cameras
    from csd.guidance import ScoreDistillation, guidance_config
    from csd.prompts import PromptProcessor, TextEmbeddingCache

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    prior = load_prior(ModelConfig(model="toy"))
    assert prior.kind == "pixel" and prior.resolution == 32
    cameras = orbit_cameras(2)
    processor = PromptProcessor(prior, "a red cube", cache=TextEmbeddingCache(prior, tmp_path))
    assert processor.texts(cameras.elevation, cameras.azimuth) == ["a red cube, front view", "a red cube, back view"]
    embeddings = processor(cameras.elevation, cameras.azimuth)

    image = torch.full((2, 3, 32, 32), 0.5, requires_grad=True)
    out = ScoreDistillation(prior, guidance_config("csd"))(prior.encode_images(image), embeddings, 0, torch.Generator().manual_seed(0))
    out.loss.backward()
    assert math.isfinite(out.loss.item()) and out.grad_norm > 0
    assert torch.isfinite(image.grad).all() and image.grad.abs().sum() > 0


# --- prompts as people write them (issue 18) ------------------------------------------------------

PEOPLE_PROMPTS = {
    "a orange cube": ["An orange cube.", "an orange cube", "The orange cube!", "Orange cube", "a cube, orange", "a cube, Orange."],
    "a red cube": ["A red cube.", "a cube, red", "A RED CUBE", "red cube;", "the Red Cube?"],
    "a blue torus, side view": ["A blue torus., side view", "the torus, blue, side view", "Blue Torus, Side View."],
}


@pytest.mark.parametrize("canonical", sorted(PEOPLE_PROMPTS))
def test_prompts_as_people_write_them_mean_the_caption(canonical):
    from csd.toy.world import canonical_prompt

    for prompt in PEOPLE_PROMPTS[canonical]:
        assert canonical_prompt(prompt) == canonical, prompt
        assert parse_prompt(prompt) == parse_prompt(canonical), prompt  # the ground truth's parser agrees


def test_canonical_prompt_keeps_every_training_caption_and_unknown_words():
    from csd.toy.world import canonical_prompt

    captions = sample_batch(256, seed=UNSEEN_SEED).captions
    assert "" in captions and any("low quality" in c for c in captions)
    assert all(canonical_prompt(c) == c for c in captions)  # what the prior was trained on is left alone
    assert canonical_prompt("noisy, blurry, oversaturated color, low quality") == "noisy, blurry, oversaturated color, low quality"
    # unknown words stay words (the tokenizer maps them to [UNK] as before), in their place
    assert canonical_prompt("A shiny red cube.") == "a shiny red cube"
    assert canonical_prompt("a red cube and a blue sphere") == "a red cube and a blue sphere"


@pytest.mark.skipif(not (TOY_PRIOR / "model_index.json").exists(), reason="the toy prior is not exported yet")
def test_toy_prior_embeds_people_prompts_as_the_caption(tmp_path):
    from csd.prompts import TextEmbeddingCache

    prior = load_prior(ModelConfig(model="toy"))
    raw = build_tokenizer()  # the shipped tokenizer's rules, without normalisation
    for canonical, prompts in PEOPLE_PROMPTS.items():
        ids = prior.tokenizer([canonical, *prompts], padding="max_length", max_length=prior.max_length).input_ids
        assert all(i == ids[0] for i in ids[1:]), canonical
        assert raw.unk_token_id not in ids[0]
        assert raw("An orange cube.").input_ids.count(raw.unk_token_id) == 2  # "an" and "." without normalisation
    embeddings = TextEmbeddingCache(prior, tmp_path).get(["a orange cube", "An orange cube.", "a cube, orange", "a red cube"])
    assert torch.equal(embeddings[0], embeddings[1]) and torch.equal(embeddings[0], embeddings[2])
    assert (embeddings[0] - embeddings[3]).abs().max() > 1e-3
    # an unknown word behaves as before: the same ids as the raw tokenizer gives, [UNK] in its place
    shiny = prior.tokenizer("a shiny red cube").input_ids
    assert shiny == raw("a shiny red cube").input_ids and shiny[2] == raw.unk_token_id
    assert prior.identity.endswith(":canonical-prompt-1")
