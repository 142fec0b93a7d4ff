"""Recipes of the generative and alignment family: fusion encoders, decoders and region
features beside the contrastive towers (SegCLIP, region-word matching, FLAVA, KELIP, CoCa, PaLI,
NLIP's completion, FIBER).
"""

from __future__ import annotations

from vlmray.config import Config, DataConfig, ModelConfig
from vlmray.config.data import ViewsConfig
from vlmray.config.objectives import ObjectiveSpec
from vlmray.recipes.registry import RECIPES


@RECIPES.register("segclip_tiny")
def segclip_tiny() -> Config:
    """SegCLIP (Luo et al., 2023) on the built-in data: clip_tiny's towers with a semantic
    group module of 8 learnable centres after 2 of the 3 ViT blocks (``split: -1``, before the
    last one; hard straight-through assignment); the last block runs over the centres, which
    are mean-pooled into the image embedding; CLIP loss. Evaluation adds open-vocabulary
    segmentation mIoU on the generator's masks. Deviations: contrastive loss only (no
    reconstruction or superpixel KL loss), trained from scratch, no Gumbel noise."""
    return Config(recipe="segclip_tiny",
                  model=ModelConfig(arch="segclip",
                                    arch_kwargs={"centres": 8, "heads": 4, "split": -1,
                                                 "hard": True}),
                  objectives=[ObjectiveSpec(name="clip")])


@RECIPES.register("regionword_tiny")
def regionword_tiny() -> Config:
    """Region-word matching (GLIP / DetCLIP style) on the built-in data: clip_tiny's towers,
    CLIP loss plus ``regionword``: up to 3 object boxes per row (``data.regions``) pooled from
    the ViT's patch tokens by area overlap, scored against the caption words naming them over
    the global batch (symmetric softmax, own temperature). Evaluation adds region-word
    grounding accuracy over the 20 class names. Deviations: ground-truth boxes from the data
    (no box prediction, no deep fusion), a softmax over the batch's phrases instead of GLIP's
    per-prompt / DetCLIP's concept-dictionary focal loss."""
    return Config(recipe="regionword_tiny", data=DataConfig(regions=3),
                  objectives=[ObjectiveSpec(name="clip"), ObjectiveSpec(name="regionword")])


@RECIPES.register("flava_tiny")
def flava_tiny() -> Config:
    """FLAVA (Singh et al., 2022) on the built-in data with clip_tiny's towers: global
    contrastive (``clip``), unimodal masked image modelling (``mim``: 40% of the patches,
    normalised-pixel targets through an MAE decoder), masked language modelling (``mlm``, 15%
    of the caption tokens), masked multimodal modelling (``mmm``: the masked caption and the
    visible patches, sharing ``mim``'s patch mask, fused by a joint encoder that predicts both)
    and image-text matching (``itm``) against random in-batch negatives, as FLAVA samples them
    (``hard_negatives=False``; with BLIP's hard negatives the 300-step zoo run never left the
    "no match" prior: on this data the most similar captions are mostly other rows of the same
    class, i.e. false negatives). Deviations: each objective owns its
    own fusion encoder (FLAVA shares one multimodal encoder between MMM and ITM); MIM / MMM
    predict pixels of uniformly masked, dropped patches (MAE) instead of dVAE tokens of
    block-masked ones; the towers are trained jointly from scratch (no unimodal pre-training).
    MLM and MMM start near log(vocab) ~ 9, so they get small weights. Pixel targets are not
    normalised per patch (``norm_pix=False``): the built-in images are flat colours, and
    standardising a flat patch only amplifies its JPEG noise into an unlearnable target."""
    pixels = {"mask_ratio": 0.4, "norm_pix": False}
    return Config(
        recipe="flava_tiny",
        data=DataConfig(views=ViewsConfig(mlm_prob=0.15)),
        objectives=[ObjectiveSpec(name="clip"),
                    ObjectiveSpec(name="mim", weight=0.5, params=pixels),
                    ObjectiveSpec(name="mlm", weight=0.05),
                    ObjectiveSpec(name="mmm", weight=0.05, params=pixels),
                    ObjectiveSpec(name="itm", weight=0.5,
                                  params={"hard_negatives": False})],
    )


@RECIPES.register("kelip_tiny")
def kelip_tiny() -> Config:
    """KELIP's multi-crop CLIP (Ko & Gu, 2022) on the built-in data with clip_tiny's towers:
    the plain image and three crops per row (``data.views``: one global, two local) are each
    contrasted with the caption (``multicrop_clip``), beside MAE's masked image modelling
    (``mim``, 75% of the patches). Deviations: KELIP pre-trains the image encoder with MAE
    first and then trains CLIP; here both losses train jointly; local crops are resized to the
    full 32 px (KELIP feeds them at a lower resolution); the pixel targets are not normalised
    per patch (MAE's norm_pix), as the built-in images' flat patches would turn into
    standardised JPEG noise."""
    return Config(
        recipe="kelip_tiny",
        data=DataConfig(views=ViewsConfig(image=["global", "local", "local"])),
        objectives=[ObjectiveSpec(name="multicrop_clip"),
                    ObjectiveSpec(name="mim", weight=0.5,
                                  params={"mask_ratio": 0.75, "norm_pix": False})],
    )


@RECIPES.register("coca_tiny")
def coca_tiny() -> Config:
    """CoCa (Yu et al., 2022) on the built-in data with clip_tiny's towers: CLIP's contrastive
    loss (weight 1) plus captioning (``caption``, weight 2 as in the paper): an attentional
    pooler (16 queries) over the ViT's projected tokens feeds a causal decoder (1 text-only +
    2 cross-attention blocks, tied LM head) that predicts each next caption token. Evaluation
    adds greedy / beam-3 caption BLEU-4 and unigram F1 on 64 held-out images. Deviations: the
    decoder's unimodal layers are its own (CoCa shares them with the contrastive text encoder,
    here the separate BERT tower), 16 pooler queries instead of 256, trained from scratch."""
    return Config(recipe="coca_tiny",
                  objectives=[ObjectiveSpec(name="clip"),
                              ObjectiveSpec(name="caption", weight=2.0)])


@RECIPES.register("pali_tiny")
def pali_tiny() -> Config:
    """PaLI's split-captioning (Chen et al., 2022) on the built-in data: a small
    encoder-decoder (2 + 2 blocks, shared token embedding) reads the ViT's projected tokens plus
    the caption's first s words (s uniform in [0, half the words]) and generates the rest
    (``pali``); CLIP's contrastive loss at weight 0.5 keeps the image tower contrastively
    aligned, as PaLI's ViT was pre-trained contrastively before. Evaluation adds greedy /
    beam-3 caption BLEU-4 and unigram F1 from an empty prefix. Deviations: no pretrained mT5 or
    ViT, one task instead of PaLI's mixture, the ViT trained jointly rather than frozen."""
    return Config(recipe="pali_tiny",
                  objectives=[ObjectiveSpec(name="clip", weight=0.5),
                              ObjectiveSpec(name="pali")])


@RECIPES.register("nlip_completion_tiny")
def nlip_completion_tiny() -> Config:
    """NLIP (Huang et al., 2023) with both schemes on the built-in noisy data, clip_tiny's
    towers: noise harmonisation (plain CLIP for the first 150 steps, ~2.5 epochs, then a GMM
    on the last 7,680 per-pair losses refitted every 30 steps) plus noise completion
    (``nlip_completion``): a concept-conditioned decoder (memory = image tokens and the
    image's top-3 colour / shape / size words) learns captions from the pairs judged clean
    (weight 1 - p), greedily captions every image each step, and an InfoNCE between images and
    their completions weighted by p (0.25 of the loss) lets the pairs judged noisy lean on
    them. Fitted at step 60 (``nlip_tiny``'s start) the two GMM components sat 0.02 apart,
    most rows were judged noisy and the completion term at weight 1 pulled zero-shot top-1
    down to 0.105 in the 300-step zoo. Deviations: the
    concept vocabulary is the data's 14 attribute words, the decoder trains jointly from
    scratch, and completions are an extra positive text rather than a caption replacement
    (see the objective's docstring)."""
    return Config(recipe="nlip_completion_tiny",
                  objectives=[ObjectiveSpec(name="nlip_completion", params={
                      "start_step": 150, "refit_every": 30, "buffer_size": 7680,
                      "caption_weight": 0.5, "aux_weight": 0.25, "concept_refresh": 30})])


@RECIPES.register("fiber_tiny")
def fiber_tiny() -> Config:
    """FIBER's coarse-grained pre-training (Dou et al., 2022) on the built-in data: clip_tiny's
    towers each end in 2 FIBER blocks (``model.arch="fiber"``: self-attention, a cross-attention
    to the other modality gated by tanh(alpha) with alpha = 0 at init, an MLP), so one set of
    weights runs as a dual encoder for ``clip`` (ITC, zero-shot) and fused for ``itm``
    (``fusion="model"``: hard negatives from the ITC similarities, head on [fused text CLS ;
    pooled fused image]) and ``mlm`` (15% of caption tokens masked, predicted from the fused
    text states, i.e. conditioned on the image). Deviations: the fusion blocks sit on top of
    small from-scratch towers instead of inside the top layers of pre-trained Swin / RoBERTa,
    the gate is tanh(alpha) rather than alpha, and no fine-grained (box) stage. Under DDP keep
    ``itm`` with ``fusion="model"`` in the mix: it is what gives every fusion parameter a
    gradient."""
    return Config(
        recipe="fiber_tiny",
        data=DataConfig(views=ViewsConfig(mlm_prob=0.15)),
        model=ModelConfig(arch="fiber", arch_kwargs={"fusion_layers": 2, "heads": 4}),
        objectives=[ObjectiveSpec(name="clip"),
                    ObjectiveSpec(name="itm", params={"fusion": "model"}),
                    ObjectiveSpec(name="mlm")],
    )
