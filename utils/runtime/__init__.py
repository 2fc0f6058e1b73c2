"""The runtime room, below the losses and the trainer and knowing nothing of training or tasks: distributed
helpers (``distributed``), device, seeding and RNG state (``device``), checkpoint I/O (``checkpoint``), run folders
(``runs``) and the scripts' error-to-exit-code wrapper (``cli``)."""
