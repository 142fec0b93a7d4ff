"""RA-CLIP's retrieval augmentation: the module alone, inside the dual encoder, and its config.

    pytest tests/models/test_retrieval_aug.py -q
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from tests.models.test_dual_encoder import B, batch, make, tiny
from vlmray.config import ConfigError, ModelConfig
from vlmray.config.objectives import ObjectiveSpec
from vlmray.data import schema
from vlmray.distributed import Dist
from vlmray.models import DualEncoder, RetrievalAugmentation, validate_model_config
from vlmray.objectives import ObjectiveMix

pytestmark = pytest.mark.usefixtures("one_torch_thread")
D, DR, K = 16, 8, 5
RA = {"ra_layers": 2, "ra_ref_dim": DR, "ra_heads": 4}


def refs(n: int = B, seed: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    """(ref_image, ref_text (n, K, DR), ref_mask (n, K)): row 0 full, row 1 with padding,
    row 2 (if any) without any reference."""
    g = torch.Generator().manual_seed(seed)
    ref_image = F.normalize(torch.randn(n, K, DR, generator=g), dim=-1)
    ref_text = F.normalize(torch.randn(n, K, DR, generator=g), dim=-1)
    mask = torch.ones(n, K)
    mask[1, 3:] = 0
    if n > 2:
        mask[2] = 0
    return ref_image, ref_text, mask


def images(n: int = B, seed: int = 1) -> Tensor:
    return F.normalize(torch.randn(n, D, generator=torch.Generator().manual_seed(seed)), dim=-1)


@pytest.fixture(scope="module")
def module() -> RetrievalAugmentation:
    torch.manual_seed(0)
    return RetrievalAugmentation(D, DR, layers=2, heads=4)


def test_shapes_and_unit_norm(module: RetrievalAugmentation) -> None:
    out = module(images(), *refs())
    assert out.shape == (B, D)
    torch.testing.assert_close(out.norm(dim=-1), torch.ones(B))


def test_row_without_references_is_unchanged_and_finite(module: RetrievalAugmentation) -> None:
    u = images().requires_grad_()
    out = module(u, *refs())
    assert torch.equal(out[2], u[2])                                 # row 2: all slots padding
    assert not torch.equal(out[0], u[0]) and not torch.equal(out[1], u[1])
    out.sum().backward()
    assert torch.isfinite(u.grad).all()
    assert all(torch.isfinite(p.grad).all() for p in module.parameters())
    module.zero_grad(set_to_none=True)
    nothing = torch.zeros(B, K)
    assert torch.equal(module(u, refs()[0], refs()[1], nothing), u)   # no refs at all


def test_padding_slots_are_ignored(module: RetrievalAugmentation) -> None:
    ref_image, ref_text, mask = refs()
    junk_image, junk_text = ref_image.clone(), ref_text.clone()
    junk_image[1, 3:], junk_text[1, 3:] = float("nan"), 1e3          # only padded slots change
    with torch.no_grad():
        torch.testing.assert_close(module(images(), junk_image, junk_text, mask),
                                   module(images(), ref_image, ref_text, mask))


def test_references_change_the_embedding(module: RetrievalAugmentation) -> None:
    """Other reference captions for the same neighbours move u_aug; the gate scales the move."""
    ref_image, ref_text, mask = refs()
    u = images()
    with torch.no_grad():
        a = module(u, ref_image, ref_text, mask)
        b = module(u, ref_image, refs(seed=5)[1], mask)
        assert (a[:2] - b[:2]).abs().max() > 1e-3
        # cos(u, u_aug) is high at init (gate tanh(0.1)): training starts close to CLIP.
        assert (a[:2] * u[:2]).sum(-1).min() > 0.9
        module.gate.fill_(3.0)
        c = module(u, ref_image, ref_text, mask)
        module.gate.fill_(0.1)
    assert (c[:2] * u[:2]).sum(-1).max() < (a[:2] * u[:2]).sum(-1).min()


def test_gradients_reach_every_module_parameter(module: RetrievalAugmentation) -> None:
    module.zero_grad(set_to_none=True)
    target = images(seed=7)
    (module(images(), *refs()) * target).sum().backward()
    for name, p in module.named_parameters():
        assert p.grad is not None and p.grad.abs().max() > 0, name
    module.zero_grad(set_to_none=True)


def test_shape_mismatch_is_an_error(module: RetrievalAugmentation) -> None:
    ref_image, ref_text, mask = refs()
    with pytest.raises(ValueError, match="disagree"):
        module(images(), ref_image[:, :3], ref_text, mask)


# --- inside the dual encoder --------------------------------------------------------------


@pytest.fixture(scope="module")
def ra_model() -> DualEncoder:
    return make(tiny(**RA))


def ra_batch() -> dict[str, Tensor]:
    ref_image, ref_text, mask = refs()
    return {**batch(), schema.REF_IMAGE_EMBEDS: ref_image, schema.REF_TEXT_EMBEDS: ref_text,
            schema.REF_MASK: mask}


def test_model_augments_image_embeddings_from_the_batch(ra_model: DualEncoder) -> None:
    b = ra_batch()
    with torch.no_grad():
        out = ra_model(b)
        plain, _ = ra_model.encode_image(b[schema.PIXELS])
        refs_ = (b[schema.REF_IMAGE_EMBEDS], b[schema.REF_TEXT_EMBEDS], b[schema.REF_MASK])
        direct, _ = ra_model.encode_image(b[schema.PIXELS], refs=refs_)
    assert out.image_embeds.shape == (B, 16)
    torch.testing.assert_close(out.image_embeds, direct)
    assert torch.equal(out.image_embeds[2], plain[2])                # row without references
    assert (out.image_embeds[:2] - plain[:2]).abs().max() > 1e-4


def test_model_without_references_in_the_batch_is_an_error(ra_model: DualEncoder) -> None:
    with pytest.raises(ValueError, match="ref_image_embeds.*ra_layers"):
        ra_model(batch())


def test_refs_without_the_module_is_an_error() -> None:
    model = make(tiny())
    with pytest.raises(ValueError, match="ra_layers"):
        model.encode_image(batch()[schema.PIXELS], refs=refs())
    with torch.no_grad():                                            # columns alone are ignored
        torch.testing.assert_close(model(ra_batch()).image_embeds, model(batch()).image_embeds)


def test_every_parameter_gets_a_gradient_under_clip(ra_model: DualEncoder) -> None:
    """DDP (find_unused_parameters=False) needs the module's parameters used too."""
    mix = ObjectiveMix.from_specs([ObjectiveSpec(name="clip")])
    b = ra_batch()
    ra_model.train()
    ra_model.zero_grad(set_to_none=True)
    mix(b, ra_model(b, mix.needs), Dist()).loss.backward()
    ra_model.eval()
    missing = [n for n, p in ra_model.named_parameters() if p.requires_grad and p.grad is None]
    assert missing == []
    assert ra_model.retrieval.gate.grad.abs() > 0


def test_state_dict_keys_unchanged_without_the_module(ra_model: DualEncoder) -> None:
    plain = make(tiny()).state_dict()
    assert not any("retrieval" in k for k in plain)
    ra_keys = set(ra_model.state_dict())
    assert set(plain) == {k for k in ra_keys if not k.startswith("retrieval.")}
    assert any(k.startswith("retrieval.") for k in ra_keys)
    make(tiny(), seed=1).load_state_dict(plain, strict=True)


def test_config_validation() -> None:
    validate_model_config(tiny(**RA))
    validate_model_config(ModelConfig())                             # off by default
    assert ModelConfig().ra_layers == 0
    with pytest.raises(ConfigError, match="ra_ref_dim"):
        validate_model_config(tiny(ra_layers=1))
    with pytest.raises(ConfigError, match="ra_heads=3.*embed_dim=16"):
        validate_model_config(tiny(ra_layers=1, ra_ref_dim=8, ra_heads=3))
    with pytest.raises(ConfigError, match="ra_layers must be an int >= 0"):   # at construction
        validate_model_config(tiny(ra_layers=-1))


def test_ref_dim_may_be_left_to_the_retrieval_stage() -> None:
    """Before the index exists its width is unknown: validation may defer it, the build not."""
    validate_model_config(tiny(ra_layers=1), ref_dim_filled_later=True)
    with pytest.raises(ConfigError, match="ra_ref_dim must be an int >= 0"):  # at construction
        validate_model_config(tiny(ra_layers=1, ra_ref_dim=-2), ref_dim_filled_later=True)
    with pytest.raises(ConfigError, match="ra_ref_dim > 0"):
        make(tiny(ra_layers=1))
