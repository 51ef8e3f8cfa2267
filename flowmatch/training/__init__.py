"""What a training run needs beyond the maths, each job in one module:

- divergence: stop before the update when the loss is NaN / infinite, and record when it happened
- resume_rng: the ResumeRNG callback (every rank's RNG streams, exact across resume, untouched by evaluation)
- finished_run: the FinishedRunCheckpoint callback (last.ckpt holds a finished fit's last step; extending it is exact)
- writable_checkpoints: the WritableCheckpoints callback (unwritable checkpoint directories refused before the first step)
- lost_peer: the LostPeerReport callback and the CLI's clear error when another process of a distributed run dies
- checkpoint_record: what a checkpoint remembers of the model (sample shape, objective, data)
- checkpoint_checks: refuse a checkpoint of another objective or network before any weight is loaded
"""
