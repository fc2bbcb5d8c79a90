import pytest
import torch

from csd.prompts import PromptProcessor, TextEmbeddingCache, ViewThresholds, view_names, view_prompt


@pytest.mark.parametrize(
    "elevation, azimuth, view",
    [
        (0, 0, "front"), (0, 44.9, "front"), (0, -44.9, "front"), (0, 45.0, "side"), (0, -45.0, "side"),
        (0, 90, "side"), (0, 135.0, "side"), (0, 135.1, "back"), (0, -135.1, "back"), (0, 180, "back"),
        (0, 225, "side"), (0, 350, "front"), (60.0, 0, "front"), (60.1, 0, "overhead"), (80, 180, "overhead"),
    ],
)
def test_view_selection_at_thresholds(elevation, azimuth, view):
    assert view_names(torch.tensor([float(elevation)]), torch.tensor([float(azimuth)])) == [view]


def test_custom_thresholds():
    names = view_names(torch.tensor([0.0, 0.0]), torch.tensor([50.0, 110.0]), ViewThresholds(front=60, back=80))
    assert names == ["front", "back"]


def test_view_prompt_and_empty_prompt():
    assert view_prompt("a red cube", "back") == "a red cube, back view"
    assert view_prompt("", "front") == ""
    with pytest.raises(ValueError, match="front, side, back, overhead"):
        view_prompt("a red cube", "left")


class CountingPrior:
    identity = "counting-prior"
    device = torch.device("cpu")
    dtype = torch.float32

    def __init__(self):
        self.encoded, self.calls, self.released = [], 0, 0

    def encode_text(self, texts):
        self.encoded += texts
        self.calls += 1
        return torch.stack([torch.full((3, 5), float(len(t))) for t in texts])

    def release_text_encoder(self):
        self.released += 1


def test_cache_encodes_once_in_memory_and_on_disk(tmp_path):
    prior = CountingPrior()
    cache = TextEmbeddingCache(prior, tmp_path)
    first = cache.get(["a red cube", ""])
    assert prior.encoded == ["a red cube", ""]
    second = cache.get(["", "a red cube"])
    assert prior.encoded == ["a red cube", ""], "second lookup must not call the text encoder"
    torch.testing.assert_close(second[1], first[0])
    # a new process (new cache object) reads the disk cache
    fresh_prior = CountingPrior()
    again = TextEmbeddingCache(fresh_prior, tmp_path).get(["a red cube"])
    assert fresh_prior.encoded == [] and torch.equal(again[0], first[0])


def test_prompt_processor_picks_view_embeddings(tmp_path):
    prior = CountingPrior()
    processor = PromptProcessor(prior, "a red cube", "ugly", cache=TextEmbeddingCache(prior, tmp_path))
    out = processor(torch.tensor([0.0, 0.0, 70.0]), torch.tensor([0.0, 180.0, 0.0]))
    lengths = [len("a red cube, front view"), len("a red cube, back view"), len("a red cube, overhead view")]
    assert out.prompt[:, 0, 0].tolist() == lengths
    assert out.negative[:, 0, 0].tolist() == [4.0] * 3  # negative prompt gets no view suffix
    assert out.null[:, 0, 0].tolist() == [0.0] * 3
    assert processor.texts(torch.tensor([0.0]), torch.tensor([90.0])) == ["a red cube, side view"]
    with pytest.raises(ValueError, match="empty"):
        PromptProcessor(prior, "  ")


def test_prompt_processor_embeds_every_text_in_one_call_then_releases_the_encoder(tmp_path):
    prior = CountingPrior()
    PromptProcessor(prior, "a red cube", "ugly", cache=TextEmbeddingCache(prior, tmp_path), perp_neg=True)
    views = [view_prompt("a red cube", v) for v in ("front", "side", "back", "overhead")]
    assert prior.calls == 1 and sorted(prior.encoded) == sorted([*views, "", "ugly"])
    assert prior.released == 1
    kept = CountingPrior()
    PromptProcessor(kept, "a red cube", cache=TextEmbeddingCache(kept, tmp_path / "other"), release_text_encoder=False)
    assert kept.released == 0
