"""Judging sampled answers: reference prompt sets and knowledge bases, detector plugins, text measures."""
