"""The command line, `python -m flowmatch COMMAND` (entry point and dispatch: flowmatch/cli/main.py).

Commands run by Lightning's CLI (flowmatch/cli/lightning_cli.py), configured by YAML files:

    fit                 train a model: --config experiments/mmdit_d16.yaml (the main job)
    validate            SD3 validation loss and sample metrics of a checkpoint: --config X --ckpt_path CKPT
    test                the same on the test split
    predict             Lightning's predict loop

The platform's own commands, one module each:

    sample              draw samples or images from a checkpoint (sample.py)
    prepare             images + captions -> latent/caption shards (prepare.py)
    reflow              (noise, sample) couplings of a trained flow for k-rectified flow (reflow.py)
    import-sd3          a local diffusers SD3 transformer directory -> a flowmatch checkpoint (import_sd3.py)
    import-flux         a local diffusers FLUX.1 transformer directory -> a flowmatch checkpoint (import_flux.py)
    export-diffusers    a checkpoint's MMDiT or FLUX -> a diffusers transformer directory (export_diffusers.py)
    export-lora         a LoRA run's adapter -> a diffusers LoRA file, or merged full weights (export_lora.py)
    convert-checkpoint  a DeepSpeed ZeRO checkpoint directory -> one checkpoint file (convert_checkpoint.py)
    compare             an HTML report comparing MLflow runs (compare.py)
    sync-metrics        send metrics kept while the tracking server was away to their MLflow run (sync_metrics.py)
    study               a whole study (variants x seeds) and its write-up in docs/results.md (study.py)

`python -m flowmatch --help` lists them; `python -m flowmatch COMMAND --help` explains one.
"""
