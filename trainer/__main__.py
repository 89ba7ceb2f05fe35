from tokenwise.trainer.cli import main

raise SystemExit(main())
