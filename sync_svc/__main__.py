from sync_svc.server import main

main()
