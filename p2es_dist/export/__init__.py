"""Publishable bundles (SPEC section 6) and loading any model this project writes."""
