from sms_svc.server import main

main()
