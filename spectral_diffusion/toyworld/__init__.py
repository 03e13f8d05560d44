"""The toy world: a procedurally drawn world of shapes, its own small SD-style model, held-out concepts, a judge.

It lets the project measure its central claim (fused concepts keep their identity) offline, on a CPU, with the same
code paths as SD 1.5. Modules, lightest first:

- `render`: 64x64 scenes (shape, colour, background, size, position) and their captions;
- `concepts`: held-out composite objects with class words from the world's vocabulary, and their photo folders;
- `judge`: a small CNN trained on renders that scores identity, shape, colour and background;
- `model`: the toy pipeline's architecture and vocabulary (trained weights in `model/`, load with
  `spectral_diffusion.models.load_base("toy")`);
- `pretrain`: the time-budgeted, resumable pretraining of that model;
- `evaluate`: the base model's prompt fidelity as read by the judge.
"""
