"""Evaluation: scoring answers, the variants compared, the eval run and its reports, diagnosis."""
