"""sms_svc: premium SMS from the carriers: parse, reply, bill."""
