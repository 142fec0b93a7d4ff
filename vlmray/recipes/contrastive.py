"""Contrastive recipes: CLIP (the default, ``clip_tiny``, and the GPU-cluster ``clip_vit_b16``)
and the image-text objectives built on its two towers (FILIP, SigLIP, UniCL, CLIPPO, OTTER, OneR,
ZeroVL, PyramidCLIP, DeCLIP, NLIP, and ``align_tiny``'s mix).
"""

from __future__ import annotations

from vlmray.config import Config, DataConfig, ModelConfig, TrainConfig
from vlmray.config.data import MixupConfig, ViewsConfig
from vlmray.config.objectives import ObjectiveSpec
from vlmray.recipes.registry import RECIPES


@RECIPES.register("clip_tiny")
def clip_tiny() -> Config:
    """CLIP on the built-in noisy data: a 3-layer ViT (32 px, 8 px patches) and a 2-layer BERT,
    128-d embeddings; learns zero-shot well above chance in a few minutes on 2 CPU cores. The
    curation text, image and dedup checks run as a streamed prefix (``data.curate``), so the
    junk alt-text, near-duplicates and corrupt rows are dropped and counted."""
    return Config(recipe="clip_tiny", data=DataConfig(curate=True),
                  objectives=[ObjectiveSpec(name="clip")])


@RECIPES.register("clip_vit_b16")
def clip_vit_b16() -> Config:
    """CLIP ViT-B/16 + a 12-layer BERT-base text tower at 224 px, for GPU clusters; point
    ``data.source`` at real shards (img2dataset layout)."""
    return Config(
        recipe="clip_vit_b16",
        data=DataConfig(image_size=224, context_length=77, vocab_size=49408),
        model=ModelConfig(vision="vit_base_patch16_224", vision_kwargs={}, embed_dim=512,
                          text={"model_type": "bert", "hidden_size": 512, "num_hidden_layers": 12,
                                "num_attention_heads": 8, "intermediate_size": 2048}),
        train=TrainConfig(steps=10_000, batch_size=1024, lr=5e-4, warmup_steps=500,
                          cpus_per_worker=4, checkpoint_every=1000, log_every=50),
        objectives=[ObjectiveSpec(name="clip")],
    )


@RECIPES.register("filip_tiny")
def filip_tiny() -> Config:
    """FILIP (Yao et al., 2021) on the built-in data with clip_tiny's towers: token-wise late
    interaction (each patch's best word, each word's best patch) beside CLIP's pooled InfoNCE.
    FILIP's loss drops the CLS token, and zero-shot eval and retrieval score the pooled
    embeddings, so the CLIP term keeps them trained."""
    return Config(recipe="filip_tiny",
                  objectives=[ObjectiveSpec(name="filip", weight=0.5),
                              ObjectiveSpec(name="clip", weight=0.5)])


@RECIPES.register("siglip_tiny")
def siglip_tiny() -> Config:
    """SigLIP (Zhai et al., 2023) on the built-in noisy data: clip_tiny's towers with the
    pairwise sigmoid loss instead of the softmax; t = exp(t') starts at 10 and the learnable
    bias b at -10, as in the paper. Negatives from other workers arrive by ring exchange, so
    each worker holds only B x B logits. Keep the default warmup: at b = -10 the first steps
    pull all embeddings together, and the model separates them again after ~40-60 steps."""
    return Config(recipe="siglip_tiny",
                  model=ModelConfig(init_temperature=0.1, init_logit_bias=-10.0),
                  objectives=[ObjectiveSpec(name="siglip")])


@RECIPES.register("unicl_tiny")
def unicl_tiny() -> Config:
    """UniCL (Yang et al., 2022) on the built-in data: clip_tiny's towers trained with the
    unified image-text-label loss. Every built-in row carries its class label, so same-class
    pairs in a batch are extra positives both ways; caption-only rows (label -1) keep CLIP's
    diagonal."""
    return Config(recipe="unicl_tiny", objectives=[ObjectiveSpec(name="unicl")])


@RECIPES.register("align_tiny")
def align_tiny() -> Config:
    """ALIGN (Jia et al., 2021) on the built-in data: an EfficientNet image tower (timm's tiny
    ``test_efficientnet``, MBConv + squeeze-excite + BatchNorm, widened 1.5x, at 64 px), a
    2-layer BERT pooled at its first token ([CLS]), and the normalised-softmax contrastive loss
    with label smoothing 0.1. ALIGN trains on noisy alt-text too large to hold; like every
    recipe, its rows stream from the shards every epoch, nothing materialised."""
    return Config(
        recipe="align_tiny",
        data=DataConfig(image_size=64),
        model=ModelConfig(vision="test_efficientnet", vision_kwargs={"channel_multiplier": 1.5},
                          text_pooling="first"),
        objectives=[ObjectiveSpec(name="clip", params={"label_smoothing": 0.1})],
    )


@RECIPES.register("clippo_tiny")
def clippo_tiny() -> Config:
    """CLIPPO (Tschannen et al., 2023) on the built-in data: each caption is rendered as a 64 px
    image (8 px font, one text line per 8 px patch row, as the paper's 16 px font on 16 px
    patches) and one 3-layer ViT (clip_tiny's), shared with the images, embeds both; CLIP
    loss, logit scale starting at 10 as in big_vision's config. No tokenizer or text tower.
    The ViT pools its CLS token: the paper's MAP head (timm ``global_pool="map"``) collapsed to
    constant embeddings in short CPU runs at this size. lr 1e-3 leaves the early plateau sooner
    than 2e-3 (zero-shot top-1 0.25, top-5 0.99 after 200 of 300 steps on 300 eval rows)."""
    return Config(
        recipe="clippo_tiny",
        data=DataConfig(image_size=64, views=ViewsConfig(render_text=True)),
        model=ModelConfig(arch="clippo", init_temperature=0.1),
        train=TrainConfig(lr=1e-3),
        objectives=[ObjectiveSpec(name="clip")],
    )


@RECIPES.register("otter_tiny")
def otter_tiny() -> Config:
    """OTTER (Wu et al., 2022) on the built-in noisy data with clip_tiny's towers: InfoNCE's
    hard target mixed 50/50 with soft targets from a Sinkhorn matching over an EMA teacher's
    image-text, image-image and text-text similarities. Momentum 0.99 instead of the paper's
    0.999: the teacher averages over ~1/(1-m) = 100 steps, so in a 300-step run it follows the
    student (0.99^300 ~ 5% of the random init left) rather than staying near its random init
    (0.999^300 ~ 74% left) and handing out noise as targets."""
    return Config(recipe="otter_tiny",
                  objectives=[ObjectiveSpec(name="otter", params={"alpha": 0.5,
                                                                  "momentum": 0.99})])


@RECIPES.register("oner_tiny")
def oner_tiny() -> Config:
    """OneR (Jang et al., 2023) on the built-in data: ONE 3-layer transformer (128 wide, 4
    heads) reads 8 px patches of 32 px images, captions, and image+caption concatenations;
    trained with the mean of its four contrasts (ITC, cross-modal mixup XMC, contextual
    invariance CIC, contextual mixup CMC; ``vlmray.objectives.contrastive.oner``)."""
    return Config(
        recipe="oner_tiny",
        model=ModelConfig(arch="oner", vision_kwargs={"patch_size": 8},
                          text={"model_type": "bert", "hidden_size": 128, "num_hidden_layers": 3,
                                "num_attention_heads": 4, "intermediate_size": 256}),
        objectives=[ObjectiveSpec(name="oner", weight=0.25)],
    )


@RECIPES.register("zerovl_tiny")
def zerovl_tiny() -> Config:
    """ZeroVL (Cui et al., 2022) on two built-in sources: the default noisy dataset and a
    second one (seed 1, half the rows, 25% mismatched captions). Debiased sampling draws every
    global batch from one source, chosen per step in proportion to its size; coin-flip mixup
    (prob 0.5, lam from Beta(0.1, 0.1)) mixes a row's pixels with its partner's and carries
    both captions; CLIP's contrastive loss at ZeroVL's temperature 0.02 (constant there; here
    the learnable temperature starts at it)."""
    return Config(
        recipe="zerovl_tiny",
        data=DataConfig(extra_sources=["builtin:1?num_train=4000&mismatch_frac=0.25"],
                        sampling="single_source", mixup=MixupConfig(prob=0.5, alpha=0.1)),
        model=ModelConfig(init_temperature=0.02),
        objectives=[ObjectiveSpec(name="clip")],
    )


@RECIPES.register("pyramidclip_tiny")
def pyramidclip_tiny() -> Config:
    """PyramidCLIP (Gao et al., 2022) on the built-in data with clip_tiny's towers: a local crop
    (half to all of the image, the paper's local-view ratio) and two derived texts, the
    caption's summary and its attribute words, made per epoch in Ray Data; the ``pyramidclip``
    loss aligns peer levels (global image-summary, crop-caption, crop-attributes) and cross
    levels (global image-attributes, crop-summary) with softened negatives. The paper's
    detector ROI level is absent: the crop stands in for it."""
    views = ViewsConfig(image=["local"], text=["summary", "attributes"],
                        local_min_scale=0.5, local_max_scale=1.0)
    return Config(recipe="pyramidclip_tiny", data=DataConfig(views=views),
                  objectives=[ObjectiveSpec(name="pyramidclip", params={
                      "local_view": 0, "summary_view": 0, "attribute_view": 1})])


@RECIPES.register("declip_tiny")
def declip_tiny() -> Config:
    """DeCLIP (Li et al., 2022) on the built-in data with clip_tiny's towers: supervision from
    every pair, four terms. ``declip_mv`` (MVS): CLIP's InfoNCE over the 2 x 2 pairs of two
    image views (the batch's crop and one more ``global`` crop) and two texts (the caption and
    an ``eda`` rewrite); its (image, caption) pair is CLIP's own loss. ``simsiam`` (ISS):
    SimSiam between the two image views' embeddings through projector and predictor MLPs with
    BatchNorm (as DeCLIP's code). ``mlm`` (TSS): BERT masked language modelling on the caption
    with 15% of its tokens masked. ``declip_nns`` (NNS): each image's extra positive is the
    nearest caption in a FIFO queue of past text embeddings. The MLM cross-entropy starts at
    log(vocab) ~ 9, three times InfoNCE's log(B), so it gets the smallest weight; the two
    other auxiliary terms get 0.2 each."""
    return Config(
        recipe="declip_tiny",
        data=DataConfig(views=ViewsConfig(image=["global"], text=["eda"], mlm_prob=0.15)),
        objectives=[ObjectiveSpec(name="declip_mv", weight=1.0),
                    ObjectiveSpec(name="simsiam", weight=0.2, params={"projector": True}),
                    ObjectiveSpec(name="mlm", weight=0.1),
                    ObjectiveSpec(name="declip_nns", weight=0.2, params={"source": "queue"})],
    )


@RECIPES.register("nlip_tiny")
def nlip_tiny() -> Config:
    """NLIP's noise harmonisation (Huang et al., 2023) on the built-in noisy data with
    clip_tiny's towers. At batch 128 on 8,000 rows an epoch is ~60 steps: the first epoch is
    plain CLIP (the warm-up in which clean pairs reach low loss first), then a two-component
    GMM on the last epoch's per-pair losses (7,680 = 60 x 128) is refitted every half epoch
    and each pair's target is softened by its posterior noise probability."""
    return Config(recipe="nlip_tiny",
                  objectives=[ObjectiveSpec(name="nlip", params={
                      "start_step": 60, "refit_every": 30, "buffer_size": 7680})])
