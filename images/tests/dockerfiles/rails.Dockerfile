FROM ruby:3.3-slim
MAINTAINER Someone <someone@example.com>
ENV RAILS_ENV=production \
    BUNDLE_WITHOUT="development test" \
    LANG=C.UTF-8
RUN apt-get update -qq && apt-get install -y build-essential libpq-dev nodejs
WORKDIR /app
COPY Gemfile Gemfile.lock ./
RUN bundle install --jobs 4 --retry 3
COPY . .
RUN bundle exec rake assets:precompile
VOLUME ["/app/log", "/app/tmp"]
EXPOSE 3000/tcp 3001
HEALTHCHECK --interval=30s --timeout=3s CMD curl -f http://localhost:3000/ || exit 1
CMD bundle exec puma -C config/puma.rb
