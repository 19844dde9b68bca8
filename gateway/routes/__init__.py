"""Thin HTTP handlers: parse, hand to dispatch, answer. The route table lives in app.py."""
