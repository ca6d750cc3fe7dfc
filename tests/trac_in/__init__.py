"""Tests of deel.influenciae.trac_in."""
