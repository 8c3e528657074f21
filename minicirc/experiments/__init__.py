"""The experiments minicirc runs on its own: the embedded default model and its synthetic language
(default.py, train.py, tasks/, default_files/), the feature-vs-neuron comparison (demo.py, its report
demo_report.py), SHIFT (the method shift.py, its run shift_run.py, its report shift_report.py) and the real
model (real_lm.py). The library (minicirc/*, model/, sae/, attribution/) never imports from here."""
