"""`dynlm experiment NAME`: one command per experiment of Wolf, Chaumond & Delangue (2018), at
CPU scale (WikiText-2, a small model) or paper scale (WikiText-103, an AWD-LSTM-sized model, GPU).

An experiment is a list of YAML override files from experiments/ (the defaults stay in config/schema.py)
and a pipeline of stages, each run through the same function as its own CLI command:

    prepare    data + tokenizer of the base model          train.setup.prepare_data
    train      the static LM (the base model)              train.static.train_static
    metatrain  the learned rule, one run per arm           train.meta.metatrain
    tune       the compared baselines, on the base weights tune.tune_checkpoint
    evaluate   every mode per article on valid, per arm    evaluate.evaluate_checkpoint
    report     RUNS/experiments/SCALE/NAME/experiment.json, experiments/RESULTS.md, README's table

Stages are keyed by what they compute, not by the experiment that asks for them: a static run is
reused by every experiment whose model, data and train settings match its saved config (found
anywhere under RUNS/, e.g. a run made by hand with `dynlm train`), a meta-training run by every arm
with the same base, learner and meta settings, a tuning by every experiment that tunes the same
weights under the same evaluation settings, and an evaluation whose recorded key (checkpoint
weights, modes, eval/rule/data/model settings) matches is not repeated. So re-running an experiment
is cheap, an interrupted one continues where it stopped, and the ablations share their reference arm.
"""
# The modules, each with one job: registry (the experiments, light to import), configs (arm configs and
# stage keys), runs (finding runs to reuse), stages (the tune and evaluate stages), runner (one experiment's
# stages in order, its plan and record), command (`dynlm experiment`), results (RESULTS.md and README's block).
