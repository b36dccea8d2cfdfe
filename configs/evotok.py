r"""EvoTok (../shared/papers/evotok.txt, SPECS 2): a residual-VQ tokenizer whose first L_pix
levels reconstruct pixels and whose first L_sem levels align with SigLIP2's features.

Variants, chosen by the text after the colon (comma-separated, applied in order):
  paper   SigLIP2-L/16 at 256 px (24 layers, 1024 wide; features of layer 23), 16 levels of
          32768 codes of 32 dims, L_pix = 4, L_sem = 16, semantic decoder 3 x 1024 (12 heads
          of 85), pixel decoder ch 128 x (1,1,2,2,4) with 3 ResBlocks per level; L2 + LPIPS +
          0.5 hinge GAN from step 20000 (not adaptive) + commitment + cosine + 4-fold cosine;
          Adam 1e-4 (0.9, 0.95), clip 1, batch 256, 500k steps, random crop + flip. Needs
          --config.teacher.path (a transformers siglip2-large-patch16-256 directory; the
          authors' teacher), --config.model.encoder.init_path (the same directory: the
          encoder starts from it, as the authors') and --config.lpips.path.
  demo    a small EvoTok on 64 px crops of the built-in photos that trains on 2 CPU cores.
  scenes  a 32 px EvoTok on the built-in procedural scenes: the EvoTok MLLM demo's tokenizer.
  tiny    tests: 32 px, a 3-layer encoder, 4 levels of 16 codes.
  table4_row1..3   Table 4: (L_pix, L_sem) = (4, 4) entangled, (16, 4) semantic-to-pixel,
                   (4, 16) pixel-to-semantic (the paper's choice) at 16 levels; as quarters
                   of num_levels at other sizes, so give them after the size
                   (`tiny,table4_row2`).
  table5_row1..4   Table 5's decoupling: (1) none ((4, 4), = table4_row1), (2) layer-wise:
                   pixels from a shallower encoder layer with their own quantizer, (3)
                   branch-wise: from a second encoder, (4) the paper's evolution
                   (= table4_row3); after a size.

The semantic terms need a teacher whose token grid is the encoder's and whose width is
model.semantic.out_width (paper: the same SigLIP2-L/16-256); `semantic=0, semantic_fold=0`
trains the pixel branch alone (the semantic decoder then gets no gradient).

  python -m unimm_jax.main --config=configs/evotok.py:paper --workdir=/ckpt/evotok \
      --config.teacher.path=/ckpt/siglip2-large-patch16-256 \
      --config.model.encoder.init_path=/ckpt/siglip2-large-patch16-256 \
      --config.lpips.path=/ckpt/lpips.safetensors
"""
import ml_collections

from unimm_jax import config_defaults


def _paper_model() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      name="evotok",
      code_dim=32,
      num_levels=16,  # L
      codebook_size=32768,  # K per level (separate codebooks)
      pixel_depth=4,  # L_pix: f_pix, the sum of the first L_pix levels, feeds the pixel decoder
      semantic_depth=16,  # L_sem: f_sem feeds the semantic decoder
      # Table 5: 'evolution' (the paper's one trajectory), 'layer' (f_pix from a second
      # quantizer on hidden_states[pixel_layer]) or 'branch' (on a second encoder); see
      # models/evotok.py. Decoupled, num_levels = pixel_depth + semantic_depth.
      decoupling="evolution",
      pixel_layer=6,  # 'layer': a quarter of the way up the 24 layers (our choice)
      decay=0.99,  # EMA of the codebooks
      vq_warmup=2000,  # updates before the EMA embedding sums follow the batch
      dead_code_threshold=1.0,  # codes whose EMA count falls below it restart (0: never)
      # Codes per distance block of the nearest-code search (memory ~ tokens x chunk); 64
      # was fastest on CPU (bench/rvq_lookup.py), larger may suit accelerators.
      lookup_chunk=64,
      # SigLIP2-large-patch16-256 (transformers `siglip` layout); the features are those of
      # the second-to-last of num_layers layers.
      encoder=ml_collections.ConfigDict(dict(
          hidden_size=1024, num_layers=24, num_heads=16, mlp_dim=4096, patch_size=16,
          image_size=256, layer_norm_eps=1e-6,
          # A transformers `siglip` directory (siglip2-large-patch16-256) the encoder of a
          # fresh run starts from, as the authors' does; empty: random (demo, tests).
          init_path="")),
      semantic=ml_collections.ConfigDict(dict(
          width=1024, depth=3, num_heads=12, mlp_ratio=4, out_width=1024)),
      decoder=ml_collections.ConfigDict(dict(
          ch=128, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=2, z_channels=256)),
      dtype="float32",
      remat=False,
      attention_impl="xla",
  ))


def get_config(arg: str = "demo") -> ml_collections.ConfigDict:
  """Returns the EvoTok config for a comma-separated list of variants."""
  config = config_defaults.base_config()
  config.task = "tokenizer"
  config.model = _paper_model()
  config.loss = ml_collections.ConfigDict(dict(
      l1=0.0,
      l2=1.0,
      perceptual=1.0,  # LPIPS (VGG); needs config.lpips.path
      gan=0.5,  # hinge, from config.disc.start, fixed weight
      commitment=1.0,
      semantic=1.0,  # 1 - cos(semantic decoder(f_sem), teacher hidden_states[-2]) per token
      semantic_fold=1.0,  # the same over 4 chunks of the width (the authors' 'fold')
  ))
  config.lpips = config_defaults.lpips_config()
  config.teacher = config_defaults.teacher_config()
  config.teacher.feature = "hidden:-2"
  config.disc = config_defaults.disc_config(
      n_layers=3, ndf=64, d_loss="hinge", g_loss="hinge", start=20000, lecam=0.0,
      adaptive=False, lr=1e-4, b1=0.9, b2=0.95)
  config.optim = ml_collections.ConfigDict(dict(
      name="adam", lr=1e-4, b1=0.9, b2=0.95, weight_decay=0.0, schedule="constant",
      warmup_steps=0, grad_clip=1.0, groups=ml_collections.ConfigDict()))
  config.ema_decay = 0.0  # the authors' training script keeps no parameter EMA
  config.data.image_size = 256
  config.train.batch_size = 256
  config.train.steps = 500_000
  return config_defaults.apply_variants(config, arg, _VARIANTS, "configs/evotok.py")


def _paper(config):
  del config  # get_config's defaults are the paper's


def _small(config, *, size: int, levels: int, codes: int, code_dim: int, pixel_depth: int):
  """A CPU-sized EvoTok on `size` px images: tokens of 8 px."""
  m = config.model
  m.update(dict(num_levels=levels, codebook_size=codes, code_dim=code_dim,
                pixel_depth=pixel_depth, semantic_depth=levels, vq_warmup=0,
                lookup_chunk=codes))
  m.encoder.update(dict(hidden_size=32, num_layers=3, num_heads=2, mlp_dim=64, patch_size=8,
                        image_size=size))
  m.pixel_layer = 1
  m.semantic.update(dict(width=24, depth=1, num_heads=3, out_width=32))
  m.decoder.update(dict(ch=32, ch_mult=(1, 1, 1, 2), num_res_blocks=0, z_channels=32))
  config.loss.perceptual = 0.0
  config.loss.gan = 0.0
  config.disc.ndf = 8
  config.data.image_size = size
  config.data.num_workers = 0


def _tiny(config):
  _small(config, size=32, levels=4, codes=16, code_dim=8, pixel_depth=2)
  # No SigLIP weights ship offline: tests write a tiny random one and set teacher.path.
  config.loss.semantic = config.loss.semantic_fold = 0.0
  config.data.source = "synthetic"
  config_defaults.set_test_schedule(config)


def _demo(config):
  """64 px crops of scikit-image's photos (held-out photos for eval), 8 x 8 tokens of 8
  levels x 256 codes. No teacher weights ship offline, so the semantic terms are off unless
  --config.teacher.path and the loss weights turn them on."""
  _small(config, size=64, levels=8, codes=256, code_dim=16, pixel_depth=4)
  _offline_demo(config, source="builtin", steps=1000, log_every=50)


def _scenes(config):
  """The EvoTok MLLM demo's tokenizer: 32 px built-in scenes with 4 px patches (8 x 8
  tokens; a shape of about 5 px would share an 8 px patch with background), 8 levels x 256
  codes of 16 dims, L_pix 4. No teacher offline: the semantic decoder is not trained, and
  the MLLM reads its (fixed, random) features of f_sem."""
  _small(config, size=32, levels=8, codes=256, code_dim=16, pixel_depth=4)
  config.model.encoder.patch_size = 4
  config.model.decoder.ch_mult = (1, 1, 2)  # 8 x 8 -> 32 px: two upsamplings
  _offline_demo(config, source="scenes", steps=1500, log_every=100)


def _offline_demo(config, *, source: str, steps: int, log_every: int):
  """A CPU demo on built-in data (`source`): no teacher, so no semantic terms; Adam 1e-3,
  batch 16, grids, checkpoints and evaluation (64 held-out images) every 500 steps."""
  config.loss.semantic = config.loss.semantic_fold = 0.0
  config.data.source = source
  config.optim.lr = 1e-3
  config.train.update(dict(batch_size=16, steps=steps, log_every=log_every, image_every=500,
                           checkpoint_every=500, eval_every=500, eval_num_images=16))
  config.eval.update(dict(num_images=64, batch_size=16))


def _depths(pixel_quarters: int, semantic_quarters: int):
  """(L_pix, L_sem) as quarters of num_levels: at 16 levels Table 4's (4, 4), (16, 4),
  (4, 16); at tiny's 4 levels (1, 1), (4, 1), (1, 4). Apply after the size variant."""
  def apply(config):
    quarter = max(1, config.model.num_levels // 4)
    config.model.pixel_depth = pixel_quarters * quarter
    config.model.semantic_depth = semantic_quarters * quarter
  return apply


def _decoupled(decoupling: str):
  """Table 5 rows 2-3: separate pixel (a quarter of num_levels) and semantic (num_levels)
  quantizers; num_levels becomes their sum. Apply after the size variant."""
  def apply(config):
    m = config.model
    m.pixel_depth, m.semantic_depth = max(1, m.num_levels // 4), m.num_levels
    m.num_levels, m.decoupling = m.pixel_depth + m.semantic_depth, decoupling
  return apply


_VARIANTS = {
    "paper": _paper,
    "demo": _demo,
    "tiny": _tiny,
    "scenes": _scenes,
    "table4_row1": _depths(1, 1),
    "table4_row2": _depths(4, 1),
    "table4_row3": _depths(1, 4),
    "table5_row1": _depths(1, 1),  # no decoupling: pixels and semantics on one depth
    "table5_row2": _decoupled("layer"),
    "table5_row3": _decoupled("branch"),
    "table5_row4": _depths(1, 4),  # the paper's pixel-to-semantic evolution
}
