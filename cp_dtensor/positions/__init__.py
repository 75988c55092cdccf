"""Host-side arithmetic on global positions: layouts, masks, block and tile plans. No tensors cross ranks here."""

__all__: list[str] = []
