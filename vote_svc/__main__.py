from vote_svc.server import main

main()
