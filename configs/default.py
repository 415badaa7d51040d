"""Every config field with its default; the experiment configs beside this file override a few.

Not a run of its own: see pretrain_multiorgan.py and finetune_busi.py.
"""
import ml_collections


def pretrain_augment() -> dict:
  """SimCLR's augmentation for grayscale ultrasound (usjax.augment.AugmentConfig: what each key does)."""
  return dict(crop_scale=(0.2, 1.0), crop_ratio=(3 / 4, 4 / 3), hflip=True, vflip=False, brightness=0.4, contrast=0.4,
              gamma=0.3, blur_prob=0.5, speckle=0.3, depth_gain_db=6.0, fan_prob=0.2, shadow_prob=0.2, rotate=0.0)


def finetune_augment() -> dict:
  """Milder, for segmentation, where the label must stay plausible: one geometry (crop = scale + translation,
  left-right flip, rotation) for image and mask, intensity changes on the image only; no fans or shadows."""
  return dict(crop_scale=(0.5, 1.0), crop_ratio=(3 / 4, 4 / 3), hflip=True, vflip=False, brightness=0.2, contrast=0.2,
              gamma=0.15, blur_prob=0.2, speckle=0.15, depth_gain_db=3.0, fan_prob=0.0, shadow_prob=0.0, rotate=15.0)


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.task = "pretrain"  # 'pretrain' | 'finetune'
  c.method = "simclr"  # a name in usjax.methods.METHODS: 'simclr' | 'moco' | 'simsiam' | 'byol'

  c.seed = 0
  c.batch_size = 32  # global: split over all devices and hosts
  c.num_steps = 100
  c.log_every = 10
  c.checkpoint_every = 50
  c.keep_checkpoints = 3
  # A resume whose batch_size, data.image_size/channels, method or model differ from its checkpoint's stops in
  # one line naming both values; True goes on with this config's values (the state is loaded where it fits).
  c.resume_anyway = False

  c.data = ml_collections.ConfigDict()
  c.data.data_dir = "~/tensorflow_datasets"  # where prepared (array_record) data sets live and are reused
  c.data.pretrain_sources = "synthetic_breast,synthetic_lung,synthetic_heart"  # pre-training mixture (usjax.data.sources)
  c.data.pretrain_weights = ""  # mixture weights, e.g. '2,1,1'; '' = equal
  c.data.pretrain_split = "train"  # never pre-train on a fine-tuning test split
  c.data.finetune_source = "synthetic_breast"  # fine-tuning / evaluation source (needs masks)
  c.data.label_fraction = 100  # % of the training labels used for fine-tuning: 100, 50, 25, 10 (nested)
  c.data.image_size = 64
  c.data.channels = 1
  # Near-duplicate images (the same scan re-saved, re-cropped, with marks) of BUSI and `us_folder` are grouped
  # and each group kept inside one split or fold (usjax.data.duplicates; 0 = off). Groups whose members carry
  # different classes are left out of training and scoring unless keep_conflicts.
  c.data.duplicate_threshold = 0.95
  c.data.keep_conflicts = False
  # folds = k > 0: grouped, class-stratified k-fold; `fold` is the test part, validation is carved from the other
  # k-1 (train:val as 70:10). 0 = the fixed 70/10/20 split.
  c.data.folds = 0
  c.data.fold = 0
  c.data.aspect = "pad"  # 'pad' | 'stretch' | 'crop' (usjax.data.pipeline)
  c.data.num_workers = 0  # grain worker processes (0 = in the main process)
  c.data.synthetic_size = 64  # the embedded synthetic set: image side, count, seed
  c.data.synthetic_num_images = 600
  c.data.synthetic_seed = 0
  # Folders of downloaded real data (README: Data), one per source of usjax.data.sources.SOURCES that needs one
  # (its `dir_key`).
  c.data.busi_dir = ""
  c.data.pocus_dir = ""
  c.data.camus_dir = ""
  c.data.us_folder_dir = ""
  c.data.natural_dir = ""

  c.model = ml_collections.ConfigDict()
  c.model.encoder = "resnet18"  # 'resnet18' | 'resnet34' | 'resnet50' | 'plain'
  c.model.decoder_widths = (256, 128, 64, 32, 16)
  c.model.norm = "batch"  # 'batch' (global-batch statistics) | 'group'
  c.model.with_decoder = False  # pre-train the whole U-Net (encoder+decoder) instead of the encoder
  c.model.proj_dims = (512, 128)  # projection head: hidden layers..., output
  # Compute dtype: 'float32', 'bfloat16' (mixed precision: weights, optimizer state, loss, BatchNorm statistics
  # and metrics stay f32) or 'auto' (bf16 on GPU/TPU and on CPUs with native bf16, AVX512-BF16 or AMX; f32 on other
  # CPUs). float32 by default: the committed results were measured in f32, and a resumed run takes the new value.
  c.model.dtype = "float32"
  c.model.conv_impl = "auto"  # convolutions and stem pool: 'xla' (plain Flax), 'cpu' (usjax.cpu_ops: the
  # same functions, faster on XLA:CPU), 'auto' (cpu on the CPU backend, else xla)

  # Divergence that stays finite stops the run like a NaN does (usjax.guard): a step's loss above
  # `loss_spike_factor` times the median of the last `window` steps, or times the run's first losses (0 = off);
  # or one update that moves the parameters by over `max_update_ratio` times their norm (0 = off), the one sign
  # of a contrastive pre-training whose loss falls back to chance after a blow-up. Normal training stays far
  # below both (Adam: an update of about learning rate / parameter RMS, 0.02-0.2).
  c.guard = ml_collections.ConfigDict()
  c.guard.loss_spike_factor = 10.0
  c.guard.window = 50
  c.guard.max_update_ratio = 10.0

  # Pre-training: frozen-feature k-NN and linear probes of the encoder (usjax.probes) every `every` steps and at
  # the end, on those of `sources` whose data folder is set (BUSI: benign/malignant/normal, train -> val;
  # POCUS: covid/regular, split by video). 0 = only at the end; -1 = off.
  c.probe = ml_collections.ConfigDict()
  c.probe.every = 500
  c.probe.sources = "busi,pocus"

  c.optim = ml_collections.ConfigDict()
  c.optim.name = "adamw"  # 'adamw' | 'lars' | 'sgd'
  c.optim.learning_rate = 1e-3
  c.optim.weight_decay = 1e-6
  c.optim.warmup_steps = 10

  # Methods (usjax/methods.py): one section per registered method, named like it and read by its from_config
  # alone. Recipe defaults of the papers, scaled to small batches where noted.
  c.simclr = ml_collections.ConfigDict()
  c.simclr.temperature = 0.5  # SimCLR: 0.5 for small batches (0.1 with batch 4096 + LARS)

  c.moco = ml_collections.ConfigDict()
  c.moco.temperature = 0.2  # MoCo v2
  c.moco.queue_size = 4096  # multiple of 2 x batch_size: both views' keys are enqueued each step
  c.moco.momentum = 0.99  # key-encoder EMA (base of the cosine if scheduled)
  c.moco.momentum_schedule = "constant"  # 'constant' | 'cosine'

  c.simsiam = ml_collections.ConfigDict()
  c.simsiam.pred_dims = (512, 128)  # predictor: hidden..., output (= model.proj_dims[-1])

  c.byol = ml_collections.ConfigDict()
  c.byol.pred_dims = (512, 128)
  c.byol.momentum = 0.996  # tau_base of the cosine schedule to 1 at num_steps (methods.BYOL.tau_base)

  c.augment = ml_collections.ConfigDict(pretrain_augment())

  c.init_from = ""  # fine-tuning: a pre-training workdir, or a torchvision/timm ResNet
  # .safetensors file (ImageNet weights; README); '' = from scratch
  c.transfer = "encoder"  # 'encoder' | 'encoder+decoder'

  # Fine-tuning: model selection on the validation split. Every `val_every` steps the validation split is scored
  # (with the raw weights and, when ema_decay > 0, their EMA); the best (step, weights) by validation Dice is kept
  # in <workdir>/best and is the model scored on `eval_split` at the end. The test split is never read while
  # training; only study configs set eval_split='test', and then the last step's test score is recorded beside.
  c.val_every = 50  # 0: validate only at the end
  c.ema_decay = 0.0  # EMA of the weights, a selection candidate beside the raw ones (0 = off)
  c.tta = "auto"  # test-time left-right flip averaging: 'auto' (kept if validation Dice says
  # so), 'none' or 'hflip'
  # Post-processing of the chosen model's masks (usjax.postprocess): 'auto' picks, on its validation
  # probabilities, a minimum component area, a minimum peak probability and keep-largest, each kept only if it
  # raises validation Dice over all images; 'none' thresholds at 0.5. 'none' by default: the committed results
  # and the study in progress were measured without it.
  c.postprocess = "none"
  # Image-level lesion-presence head (global average pool of the deepest encoder feature -> Dense -> 1 logit),
  # trained with the segmentation: loss + weight * BCE(logit, mask has a lesion pixel). 0 = no head. Masks of
  # images whose presence probability is below a threshold chosen on validation are emptied (`gate`):
  # 'lesion_budget' clears the most false lesions on normal scans while validation Dice on lesion images drops by
  # at most `lesion_budget`; 'best_dice' maximises validation Dice over all images (off where no gate raises it).
  # `gate_on`: the head's probability ('head'), the mask's peak probability ('peak'), or the one of the two that
  # does better on validation ('auto').
  c.presence = ml_collections.ConfigDict()
  c.presence.weight = 0.0
  c.presence.gate = "lesion_budget"
  c.presence.lesion_budget = 0.01
  c.presence.gate_on = "auto"
  c.eval_split = "val"
  return c
