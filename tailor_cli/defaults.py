"""Default settings, declared once: the CLI's options and the core's option dataclasses read them here.

Kept free of heavy imports (no torch, no timm) so that ``nettailor --help`` stays fast.
The training recipe is measured, not the authors' (docs/method.md, "Training recipe"): SGD with
Nesterov momentum, a zero-initialised classifier, a linear warm-up then cosine decay per step,
label smoothing 0.1. The authors' recipe (step decay x0.1 at 40% of the epochs, no warm-up, no
smoothing, plain momentum, lr 0.01 / 0.1 / 0.01) stays reachable: ``--schedule step
--warmup-epochs 0 --label-smoothing 0 --no-nesterov`` and their learning rates (``PAPER_LR``).
"""
from __future__ import annotations

EPOCHS = {"teacher": 20, "tailor": 40, "finetune": 20}  # the student still climbs at 20 (docs/method.md)
LR = {"teacher": 0.05, "tailor": 0.05, "finetune": 0.01}  # finetune's also trains the K search's candidates
PAPER_LR = {"teacher": 0.01, "tailor": 0.1, "finetune": 0.01}  # the authors' code (SVHN demo)
SCHEDULE = "cosine"  # or "step": x0.1 every --lr-step epochs (the authors')
WARMUP_EPOCHS = {"teacher": 1.0, "tailor": 1.0, "finetune": 0.0}  # finetune starts from trained weights
LABEL_SMOOTHING = 0.1  # of the training cross-entropy, every stage
BATCH_SIZE = {"teacher": 64, "tailor": 32, "finetune": 32}
MOMENTUM = 0.9  # SGD, every stage
NESTEROV = True  # Nesterov momentum (timm's `sgd`); the authors' was plain momentum
WEIGHT_DECAY = 5e-4  # none on the attention logits
CLIP_GRAD = 10.0  # max L2 norm of the weights' gradients per step, every stage (docs/method.md, "Gradient clipping")
TRAIN_STAGES = tuple(LR)

VAL_FRACTION = 0.1  # of the training data, for data without a validation split
SPLIT_SEED = 0  # the validation split we make; not --seed, so that every training seed is measured on the same images

MAX_SKIP = 3
COMPLEXITY_WEIGHT = 0.3
TEACHER_WEIGHT = 10.0
TEACHER_LOSS = "mse"
TRAIN_BN = False  # True: the blocks' BatchNorm scale and shift are the task's own (measured: docs/method.md, sessions 11-13)
KD_WEIGHT = 0.0  # logit distillation next to the feature term; off: the paper's loss (measured: docs/method.md, "The loss")
KD_TEMPERATURE = 4.0
ATTENTION_SLOW_SHARE = 0.25  # of the tailor epochs, when --attention-slow-epochs is not given: 10 of 40
ATTENTION_SLOW_FACTOR = 0.1  # the attention logits' rate in those epochs, times the stage's (docs/method.md, session 18)

THRESHOLD = 0.05
TOLERANCE = 0.5
SEARCH_EPOCHS = 5  # per K candidate; 2 ranked lean networks wrongly both ways (docs/method.md, "Measured", session 9)
FALLBACKS = 2  # less pruned networks prune --auto fine-tunes in turn when the chosen one misses the tolerance

PROGRESS_SECONDS = 30.0  # non-TTY progress: a line at most this often inside an epoch ($NETTAILOR_PROGRESS_SECONDS)
