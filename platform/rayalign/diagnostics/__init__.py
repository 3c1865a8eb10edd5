"""Diagnostics: making DPO's failure mode visible.

``audit`` (δ_ref and the data, before training), ``alarms`` (during training), ``report`` (tables
and plots of finished runs), ``pathology`` (the exact two-response maths behind it all).
"""
