import pytest
import torch
import torch.nn.functional as F

from models.losses import LOSSES, ClipLoss, LogSoftmaxLoss


def per_anchor_loss(audio, text, audio_ids, temperature, dist):
    """The DCASE 2023 baseline definition, written as a plain loop over anchors."""
    if dist == "cosine_similarity":
        audio, text = F.normalize(audio, dim=-1), F.normalize(text, dim=-1)
    n = audio.size(0)
    total = 0.0
    for i in range(n):
        candidates = [j for j in range(n) if audio_ids[j] != audio_ids[i]] + [i]
        target = torch.tensor(len(candidates) - 1)  # i is the last candidate
        s_a2t = torch.stack([audio[i] @ text[j] for j in candidates]) / temperature
        s_t2a = torch.stack([audio[j] @ text[i] for j in candidates]) / temperature
        total = total + F.cross_entropy(s_a2t, target) + F.cross_entropy(s_t2a, target)
    return total / n


@pytest.mark.parametrize("dist", ["dot_product", "cosine_similarity"])
@pytest.mark.parametrize("temperature", [0.07, 1.0])
def test_loss_equals_per_anchor_definition(dist, temperature):
    torch.manual_seed(0)
    audio, text = torch.randn(12, 8), torch.randn(12, 8)
    audio_ids = torch.tensor([0, 0, 1, 2, 2, 2, 3, 4, 5, 5, 6, 7])  # several captions of one clip in a batch
    fast = LogSoftmaxLoss(temperature=temperature, dist=dist)(audio, text, audio_ids)
    assert torch.allclose(fast, per_anchor_loss(audio, text, audio_ids, temperature, dist), rtol=1e-5, atol=1e-5)


def test_same_clip_captions_are_not_negatives():
    # Two rows of the same clip with swapped texts: for anchor 0 the only candidate is itself, loss 0.
    audio = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    text = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    loss = LogSoftmaxLoss(temperature=0.1)(audio, text, torch.tensor([3, 3]))
    assert loss.item() == pytest.approx(0.0, abs=1e-6)


def test_gradients_flow_to_both_towers():
    audio = torch.randn(6, 4, requires_grad=True)
    text = torch.randn(6, 4, requires_grad=True)
    LogSoftmaxLoss()(audio, text, torch.arange(6)).backward()
    assert audio.grad.abs().sum() > 0 and text.grad.abs().sum() > 0


def test_registry_builds_loss_and_rejects_bad_temperature():
    loss = LOSSES.build(LogSoftmaxLoss.Config(temperature=0.5))
    assert isinstance(loss, LogSoftmaxLoss) and loss.config.temperature == 0.5
    with pytest.raises(ValueError, match="temperature"):
        LogSoftmaxLoss(temperature=0.0)
    with pytest.raises(
        TypeError, match=r"takes a LogSoftmaxLoss\.Config or keyword fields \(name, temperature, dist\)"
    ):
        LogSoftmaxLoss(0.1)


def per_anchor_clip_loss(audio, text, temperature):
    """open_clip's ClipLoss written per anchor: the diagonal is each row's only positive."""
    n = audio.size(0)
    a2t = [
        F.cross_entropy(torch.stack([audio[i] @ text[j] for j in range(n)]) / temperature, torch.tensor(i))
        for i in range(n)
    ]
    t2a = [
        F.cross_entropy(torch.stack([audio[j] @ text[i] for j in range(n)]) / temperature, torch.tensor(i))
        for i in range(n)
    ]
    return (torch.stack(a2t).mean() + torch.stack(t2a).mean()) / 2


@pytest.mark.parametrize("temperature", [0.07, 0.5])
def test_clip_loss_equals_per_anchor_definition(temperature):
    torch.manual_seed(1)
    audio, text = F.normalize(torch.randn(10, 6), dim=-1), F.normalize(torch.randn(10, 6), dim=-1)
    audio_ids = torch.tensor([0, 0, 1, 2, 3, 4, 5, 6, 7, 8])  # the same clip twice: a negative for ClipLoss
    fast = ClipLoss(temperature=temperature)(audio, text, audio_ids)
    assert torch.allclose(fast, per_anchor_clip_loss(audio, text, temperature), atol=1e-5)
    assert isinstance(LOSSES.build(ClipLoss.Config(temperature=temperature)), ClipLoss)


@pytest.mark.parametrize(
    "loss", [LogSoftmaxLoss(temperature=0.1), ClipLoss(temperature=0.1)], ids=lambda loss: type(loss).__name__
)
def test_every_loss_takes_scaled_pair_scores_or_a_learnable_scale(loss):
    torch.manual_seed(2)
    audio, text, ids = torch.randn(8, 4), torch.randn(8, 4), torch.tensor([0, 1, 1, 2, 3, 4, 5, 6])
    from_embeds = loss(audio, text, ids)
    assert torch.allclose(loss.from_scores((audio @ text.T) / 0.1, ids), from_embeds)
    scale = torch.tensor(10.0, requires_grad=True)  # a learnable 1 / temperature replaces the config's
    with_scale = loss(audio, text, ids, logit_scale=scale)
    assert torch.allclose(with_scale, from_embeds)
    with_scale.backward()
    assert scale.grad is not None and scale.grad.abs() > 0
