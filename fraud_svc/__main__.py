from fraud_svc.server import main

main()
