"""Vendor modules. Adding a vendor: its facts (`keybrake.proxy.vendor_facts`), one module
implementing `Vendor`, one entry here, its prices."""

from __future__ import annotations

from keybrake.proxy.vendors.base import Vendor
from keybrake.proxy.vendors.resend import Resend
from keybrake.proxy.vendors.stripe import Stripe
from keybrake.proxy.vendors.twilio import Twilio

__all__ = ["VENDORS", "Vendor"]

VENDORS: dict[str, type[Vendor]] = {cls.name: cls for cls in (Stripe, Twilio, Resend)}
